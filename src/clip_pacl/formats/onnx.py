"""Export a CLIP's two encoders to ONNX, for serving without PyTorch.

Writes `image_encoder.onnx` ((B, 3, H, W) float32 pixels, CLIP-normalised -> (B, D) L2-normalised
features), `text_encoder.onnx` ((B, context) int64 token ids -> (B, D) L2-normalised features), and
`clip_onnx.json` with what a caller needs to prepare inputs (size, mean/std, context length, logit scale).

The graphs use the towers' inference paths (`fast=True`, `models/layers.py`), whose tricks trace to a fixed graph:
one-row attention in the last block and folded BatchNorm (oneDNN linears fall back to standard ops under tracing).
The text graph runs the whole context (no EOT trimming, whose length the trace would freeze at the example's):
the causal mask makes every position before EOT independent of what follows, so the pooled output is identical
for any caption length.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.errors import CheckpointError, MissingDependencyError
from clip_pacl.models.clip import CLIP
from clip_pacl.models.quantize import check_not_quantized
from clip_pacl.transforms import OPENAI_MEAN, OPENAI_STD

IMAGE_ENCODER_NAME = "image_encoder.onnx"
TEXT_ENCODER_NAME = "text_encoder.onnx"
METADATA_NAME = "clip_onnx.json"
DEFAULT_OPSET = 17


class ImageEncoder(nn.Module):
    """(B, 3, H, W) pixels -> (B, D) L2-normalised features."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.visual = model.visual

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(image, fast=True), dim=-1)  # (B, D)


class TextEncoder(nn.Module):
    """(B, context) token ids -> (B, D) L2-normalised features, over the full, fixed context (see the module
    docstring for why that is exact)."""

    def __init__(self, model: CLIP):
        super().__init__()
        self.text = model.text

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens, fast=True, trim=False), dim=-1)  # (B, D)


def export_onnx(model: nn.Module, out_dir: str | Path, opset: int = DEFAULT_OPSET,
                batch_dynamic: bool = True) -> dict[str, Any]:
    """Write both encoders and their metadata to `out_dir`; returns the metadata (with file paths).

    The graphs take any batch size; with `batch_dynamic=False` only batch size 1, which lets runtimes fold more
    shapes.
    """
    if not isinstance(model, CLIP):
        raise CheckpointError(f"ONNX export handles CLIP models; this is a {type(model).__name__}")
    check_not_quantized(model, "export")
    try:
        import onnx  # noqa: F401 (the exporter needs it)
    except ImportError:
        raise MissingDependencyError("onnx", "onnx", "ONNX export") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    param = next(model.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        model = copy.deepcopy(model).float().cpu()  # export in fp32 on CPU without touching the caller's model
    was_training = model.training
    size, context = model.image_size, model.context_length
    image = torch.randn(1, 3, size, size)
    tokens = torch.zeros(1, context, dtype=torch.long)
    tokens[0, :3] = torch.tensor([model.config.text.vocab_size - 2, 320, model.config.text.vocab_size - 1])
    try:
        # The wrappers must be in eval mode too: the exporter restores the top module's mode recursively.
        _export(ImageEncoder(model).eval(), image, out / IMAGE_ENCODER_NAME, "image", "image_features", opset,
                batch_dynamic)
        _export(TextEncoder(model).eval(), tokens, out / TEXT_ENCODER_NAME, "text", "text_features", opset,
                batch_dynamic)
    finally:
        model.train(was_training)
    meta = {
        "image_encoder": IMAGE_ENCODER_NAME,
        "text_encoder": TEXT_ENCODER_NAME,
        "image_input": {"name": "image", "shape": ["batch" if batch_dynamic else 1, 3, size, size], "dtype": "float32"},
        "text_input": {"name": "text", "shape": ["batch" if batch_dynamic else 1, context], "dtype": "int64"},
        "outputs": {"image": "image_features", "text": "text_features", "normalized": True},
        "image_size": size,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "context_length": context,
        "embed_dim": model.embed_dim,
        "logit_scale": model.logit_scale.detach().exp().item(),
        "opset": opset,
    }
    (out / METADATA_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "dir": str(out)}


def _export(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str, opset: int,
            batch_dynamic: bool) -> None:
    dynamic_axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if batch_dynamic else None
    # torch's default exporter needs onnxscript; the TorchScript-based one is enough for these graphs.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          opset_version=opset, dynamic_axes=dynamic_axes, dynamo=False)
