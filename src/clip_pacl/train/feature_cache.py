"""`--cache-features` for PACL: encode every training image and caption with the frozen CLIP once.

With the CLIP frozen, its patch tokens and text embeddings never change, so an epoch only needs the
embedders: after one pass over the data (eval transform, so **no augmentation**: every epoch sees the
same crop of each image), a step costs a few small matrix products instead of two transformer towers.
The cache lives in memory, in float16 by default (a ViT-B/16 image is 196 x 512 x 2 bytes = 200 KB);
each process of a DDP run builds the whole cache and the sampler picks its shard from it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from clip_pacl.data import FeatureBatch, load_image
from clip_pacl.data.dataset import tokens_1d
from clip_pacl.errors import ConfigError, DataError
from clip_pacl.models.pacl import PACL


class CachedFeatureDataset(Dataset):
    """Caption rows as (CLIP patch tokens (N, D), CLIP text embedding (D,)) float pairs; None for unreadable images.

    Indexable like `CaptionDataset` (an int or the sampler's `(index, seed)` pair), so `build_loader`,
    `collate_skip_bad` and the training loop treat it like any caption dataset; its batches are `FeatureBatch`es,
    which the loop feeds to `CachedFeatureModel.loss_features`.
    """

    batch_type = FeatureBatch

    def __init__(self, patch_tokens: torch.Tensor, text_embeddings: torch.Tensor, image_of_row: torch.Tensor,
                 readable: torch.Tensor):
        self.patch_tokens = patch_tokens  # (M images, N, D)
        self.text_embeddings = text_embeddings  # (R rows, D)
        self.image_of_row = image_of_row  # (R,) index into patch_tokens
        self.readable = readable  # (M,) bool

    def __len__(self) -> int:
        return len(self.text_embeddings)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        index = key[0] if isinstance(key, tuple) else key
        image = int(self.image_of_row[index])
        if not self.readable[image]:
            return None
        return self.patch_tokens[image].float(), self.text_embeddings[index].float()


class CachedFeatureModel(nn.Module):
    """A PACL trained on its CLIP's cached features: `loss_features` takes `FeatureBatch` inputs, (patch tokens
    (B, N, D_clip), text embeddings (B, D_clip)), instead of pixels and token ids; the temperature is the PACL's.
    The checkpoint is the PACL's own (`pacl`); this wrapper only routes the features."""

    def __init__(self, pacl: PACL):
        super().__init__()
        self.pacl = pacl

    @property
    def logit_scale(self) -> nn.Parameter:
        """The PACL's log-space temperature parameter."""
        return self.pacl.logit_scale

    @property
    def logit_bias(self) -> None:
        """PACL learns no bias."""
        return self.pacl.logit_bias

    def loss_features(self, patch_tokens: torch.Tensor, text_embeddings: torch.Tensor) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
        """(patch embeddings (B, N, D), text embeddings (B, D)) for the loss, as `PACL.loss_features` gives them."""
        return self.pacl.loss_features_from_cache(patch_tokens, text_embeddings)


class _Images(Dataset):
    def __init__(self, paths: list, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        try:
            return self.transform(load_image(self.paths[i])), True
        except DataError:
            return torch.zeros(0), False


def _collate(batch: list[tuple[torch.Tensor, bool]]) -> tuple[list[torch.Tensor], list[bool]]:
    return [b[0] for b in batch], [b[1] for b in batch]


@torch.no_grad()
def build_feature_cache(
    model: torch.nn.Module,
    dataset: Dataset,
    image_size: int | None = None,
    batch_size: int = 64,
    workers: int = 0,
    dtype: torch.dtype = torch.float16,
    progress: bool = False,
) -> CachedFeatureDataset:
    """Encode `dataset`'s rows (a `CaptionDataset`: `.rows` with `.image`/`.caption`, `.tokenizer`) with the PACL
    model's frozen CLIP. Each distinct image is encoded once, however many captions it has."""
    if not isinstance(model, PACL):
        raise ConfigError("--cache-features is for --objective pacl (a PACL model over a frozen CLIP)")
    if not model.vision_frozen:
        raise ConfigError("--cache-features needs the whole image tower frozen (unfreeze_last_n_blocks=0)")
    rows = getattr(dataset, "rows", None)
    if rows is None:
        raise ConfigError("--cache-features needs a caption file (CSV/TSV/JSONL), not a streaming dataset")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    paths: dict[str, int] = {}
    image_of_row = torch.tensor([paths.setdefault(str(row.image), len(paths)) for row in rows])  # (R,)
    loader = DataLoader(_Images(list(paths), model.image_transform(image_size=image_size)), batch_size=batch_size,
                        num_workers=workers, collate_fn=_collate)
    patch_tokens: torch.Tensor | None = None  # (M, N, D), allocated at the first readable batch
    readable = torch.zeros(len(paths), dtype=torch.bool)
    start = 0
    for pixels, ok in tqdm(loader, desc="caching image features", unit="batch", disable=not progress):
        good = [p for p, k in zip(pixels, ok) if k]
        if good:
            tokens = model.clip_patch_tokens(torch.stack(good).to(device)).to("cpu", dtype)  # (b_good, N, D)
            if patch_tokens is None:
                patch_tokens = torch.zeros(len(paths), *tokens.shape[1:], dtype=dtype)
            rows_ok = start + torch.nonzero(torch.tensor(ok)).flatten()
            patch_tokens[rows_ok] = tokens
            readable[rows_ok] = True
        start += len(ok)
    if patch_tokens is None:
        raise DataError("none of the training images could be read")
    text_chunks = []
    for first in tqdm(range(0, len(rows), batch_size), desc="caching text features", unit="batch",
                      disable=not progress):
        tokens = torch.stack([tokens_1d(dataset.tokenizer, row.caption) for row in rows[first:first + batch_size]])
        text_chunks.append(model.clip_text_embeddings(tokens.long().to(device)).to("cpu", dtype))  # (b, D)
    model.train(was_training)
    return CachedFeatureDataset(patch_tokens, torch.cat(text_chunks), image_of_row, readable)
