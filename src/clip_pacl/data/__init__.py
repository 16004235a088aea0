"""Data: readers for every caption/label format, the training dataset and loader, the synthetic set.

Readers return rows (image path + caption or label) and never decode images; datasets decode in
loader workers and turn unreadable images into None, which `collate_skip_bad` drops and counts.
"""

from clip_pacl.data.batch import FeatureBatch, TokenBatch
from clip_pacl.data.check import DataReport, check_caption_data
from clip_pacl.data.dataset import (
    CaptionDataset,
    EpochSampler,
    build_caption_dataset,
    build_loader,
    collate_skip_bad,
    set_loader_epoch,
)
from clip_pacl.data.formats import DATA_FORMATS, read_caption_rows, resolve_data_path
from clip_pacl.data.images import IMAGE_EXTENSIONS, load_image
from clip_pacl.data.rows import CaptionRow, LabelRow, split_by_image
from clip_pacl.data.tables import read_label_rows

__all__ = [
    "DATA_FORMATS",
    "IMAGE_EXTENSIONS",
    "CaptionDataset",
    "CaptionRow",
    "DataReport",
    "EpochSampler",
    "FeatureBatch",
    "LabelRow",
    "TokenBatch",
    "build_caption_dataset",
    "build_loader",
    "check_caption_data",
    "collate_skip_bad",
    "load_image",
    "read_caption_rows",
    "read_label_rows",
    "resolve_data_path",
    "set_loader_epoch",
    "split_by_image",
]
