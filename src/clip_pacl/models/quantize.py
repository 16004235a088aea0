"""Int8 inference on the CPU: dynamic quantization of the linear layers (`quantize_int8`, `load(..., quantize="int8")`,
`--int8` on the commands that encode).

What it computes, per linear layer y = x W^T + b: W is stored as int8 per output row (symmetric, scale = max |W_row| /
127); at each call x is quantized to uint8 with one affine scale over the whole input tensor (its min and max), the
product is accumulated in int32 and rescaled to float32, and b is added in float32. This is
`torch.ao.quantization.quantize_dynamic` with per-channel weights, on the same kernels (`quantized::linear_dynamic`:
fbgemm on x86, qnnpack on ARM). Everything else (LayerNorm, attention, GELU, the patch convolution, the final
projections, ResNet convolutions) stays float32.

Why not `quantize_dynamic` itself: it swaps `nn.Linear` modules only, and the towers' attention keeps its packed q/k/v
projection as a bare parameter (OpenAI's weight names), a quarter of a block's multiply-adds that would stay float32.
Here `Int8Attention` quantizes it too. Deprecation (torch 2.14): `torch.ao.quantization` and the quantized-tensor
constructors (`torch.quantize_per_channel`) warn that they will be removed in favour of torchao; the kernels work
and are what `quantize_dynamic` runs. The constructor's warning is silenced here (this note is its record).

Consequences worth knowing: the activation scale is per call, so an image's int8 embedding depends slightly on the
other images of its batch (cosine to float32 >= 0.99 either way: tests/test_quantize.py); the int8 layers have no
gradients, so an int8 model refuses to run with autograd on (train the float32 model); it cannot be saved (save the
float32 model and quantize when loading). A ResNet image tower is left in float32 (its convolutions dominate and
dynamic quantization has no convolutions); its text tower is quantized.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from clip_pacl.errors import CheckpointError, ConfigError
from clip_pacl.models.layers import Attention, Linear
from clip_pacl.models.resnet import ModifiedResNet

QUANTIZATIONS = ("int8",)
# reduce_range: fbgemm's kernels use 7-bit activations on CPUs without VNNI instructions, where 8-bit products can
# saturate its 16-bit intermediate sums (PyTorch's default qconfig for fbgemm does the same); qnnpack needs no margin.
ENGINES = {"fbgemm": True, "qnnpack": False}


def int8_engine() -> str:
    """The quantized engine int8 layers are packed for: fbgemm (x86) or qnnpack (ARM)."""
    supported = torch.backends.quantized.supported_engines
    for engine in ENGINES:
        if engine in supported:
            return engine
    raise ConfigError(f"int8 inference needs PyTorch's fbgemm (x86) or qnnpack (ARM) quantized engine; this "
                      f"PyTorch build has {', '.join(e for e in supported if e != 'none') or 'none'}")


@contextmanager
def _packing_engine(engine: str):
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (per output row) and int8 activations quantized per call: (..., in) ->
    (..., out) float32. Built from float32 weights; `weight` and `bias` read back the (dequantized) values."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, engine: str):
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        scales = (weight.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).double()  # (out,)
        zero_points = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings(), _packing_engine(engine):
            warnings.filterwarnings("ignore", message=r".*quantize_per_tensor, torch\.quantize_per_channel")
            qweight = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.detach().float())
        self.reduce_range = ENGINES[engine]

    @classmethod
    def from_linear(cls, linear: nn.Linear, engine: str) -> Int8Linear:
        """The int8 version of a float `nn.Linear`."""
        return cls(linear.weight, linear.bias, engine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_features) float32 -> (..., out_features) float32."""
        if torch.is_grad_enabled():
            raise ConfigError("this model is int8-quantized and has no gradients: run it under torch.no_grad() or "
                              "torch.inference_mode(), and train (or differentiate) the float32 model instead")
        return torch.ops.quantized.linear_dynamic(x, self._packed, self.reduce_range)

    def forward_fast(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """The inference path's call (`models/layers.py`): `self(x)` in int8, then exact GELU when `gelu`."""
        y = self(x)
        return F.gelu(y) if gelu else y

    @property
    def weight(self) -> torch.Tensor:
        """The int8 weights as float32 (out, in): what the layer multiplies by."""
        return torch.ops.quantized.linear_unpack(self._packed)[0].dequantize()

    @property
    def bias(self) -> torch.Tensor | None:
        """The float32 bias (out,), or None."""
        return torch.ops.quantized.linear_unpack(self._packed)[1]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        qweight, bias = torch.ops.quantized.linear_unpack(self._packed)
        destination[prefix + "weight_int8"] = qweight.int_repr()
        destination[prefix + "weight_scale"] = qweight.q_per_channel_scales().float()
        if bias is not None:
            destination[prefix + "bias"] = bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Attention(Attention):
    """`Attention` with int8 q/k/v and output projections; `in_proj_weight` / `in_proj_bias` read back the
    dequantized values (the one-row attention, `Attention.forward_row`, multiplies by them)."""

    def __init__(self, attn: Attention, engine: str):
        nn.Module.__init__(self)  # not Attention.__init__: no float32 parameters to allocate
        self.heads = attn.heads
        self.in_proj = Int8Linear(attn.in_proj_weight, attn.in_proj_bias, engine)
        self.out_proj = Int8Linear.from_linear(attn.out_proj, engine)

    def in_projection(self, x: torch.Tensor, fast: bool = False) -> torch.Tensor:
        """(..., D) -> (..., 3D), in int8 on either path."""
        return self.in_proj(x)

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """(3D, D) float32, dequantized."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor:
        """(3D,) float32."""
        return self.in_proj.bias


def quantize_int8(model: nn.Module, inplace: bool = False) -> nn.Module:
    """`model` (a copy, unless `inplace`) in eval mode with every `nn.Linear` and every attention of the transformer
    towers (and heads) replaced by int8 layers; a ResNet image tower stays float32. CPU and float32 weights only."""
    engine = int8_engine()
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params):
        raise ConfigError("int8 inference runs on the CPU only: load the model with device='cpu' (--device cpu)")
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in params):
        raise ConfigError("int8 quantization starts from float32 weights: call model.float() first")
    if is_quantized(model):
        raise ConfigError("the model is already int8-quantized")
    model = model if inplace else copy.deepcopy(model)
    _swap(model.eval(), engine)
    return model


def _swap(module: nn.Module, engine: str) -> None:
    for name, child in module.named_children():
        # Exact types, as quantize_dynamic: other nn.Linear subclasses (NonDynamicallyQuantizableLinear) are read as
        # weights by their parents, not called.
        if type(child) in (nn.Linear, Linear):
            setattr(module, name, Int8Linear.from_linear(child, engine))
        elif isinstance(child, Attention):
            setattr(module, name, Int8Attention(child, engine))
        elif not isinstance(child, ModifiedResNet):
            _swap(child, engine)


def check_quantization(kind: str | None) -> None:
    """Refuse an unknown quantization name, or int8 where this PyTorch has no engine for it."""
    if kind is not None and kind not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization '{kind}' ({', '.join(QUANTIZATIONS)})")
    if kind == "int8":
        int8_engine()


def quantize(model: nn.Module, kind: str | None, inplace: bool = False) -> nn.Module:
    """`model` quantized as `kind` names ("int8"), or unchanged for None."""
    check_quantization(kind)
    return model if kind is None else quantize_int8(model, inplace=inplace)


def is_quantized(model: nn.Module) -> bool:
    """True when any layer of `model` is int8."""
    return any(isinstance(m, Int8Linear) for m in model.modules())


def check_not_quantized(model: nn.Module, action: str) -> None:
    """Refuse to `action` (save, export...) an int8 model, whose weights no longer are the float32 ones."""
    if is_quantized(model):
        raise CheckpointError(f"cannot {action} an int8-quantized model: {action} the float32 model, and quantize "
                              f"it when loading (load(..., quantize='int8'), --int8)")
