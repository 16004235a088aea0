"""The library constants the parsers show or check (choices, defaults), copied here so that building the parser
imports no torch: `clip-pacl --help`, `clip-pacl CMD --help` and argument errors answer at once. Their homes
(named beside each) import torch; tests/test_cli_startup.py checks every copy equals its original.
"""

AUTO_MIN_VECTORS = 100_000  # clip_pacl.retrieval.ann
AUTO_RERANK = 40  # clip_pacl.retrieval.ann
CALIBRATION_IMAGES = 1000  # clip_pacl.segmentation.calibrate
DATA_FORMATS = ("csv", "tsv", "jsonl", "json", "coco", "flickr", "folder", "wds")  # clip_pacl.data.formats
DEFAULT_CS = tuple(10.0 ** e for e in range(-6, 7))  # clip_pacl.eval.linear_probe
DEFAULT_OPSET = 17  # clip_pacl.formats.onnx
DEFAULT_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a photo of a small {}.",  # segmentation.predict
                     "a photo of a large {}.")
METHODS = ("pacl", "patch", "maskclip")  # clip_pacl.segmentation.predict
NO_CLASS = 255  # clip_pacl.segmentation.predict
OBJECTIVES = ("clip", "pacl", "siglip")  # the keys of clip_pacl.losses.OBJECTIVES
W = 2.5  # clip_pacl.metrics
