"""WiSE-FT: interpolate the weights of a base model and its fine-tuned version.

Fine-tuning a CLIP on a narrow dataset improves that dataset and erodes zero-shot robustness;
the weight-space average of the two models (Wortsman et al., 2022) keeps most of both. alpha = 0
is the base model, alpha = 1 the fine-tuned one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from clip_pacl.errors import CheckpointError


def check_same_architecture(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                            names: tuple[str, str] = ("A", "B")) -> None:
    """Raise a one-sentence CheckpointError naming the first tensor that differs in name or shape."""
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        key, where = (only_a[0], names[0]) if only_a else (only_b[0], names[1])
        raise CheckpointError(f"{names[0]} and {names[1]} are different architectures: {key} is only in {where} "
                              f"({len(only_a) + len(only_b)} tensors differ)")
    for key, tensor in a.items():
        if tensor.shape != b[key].shape:
            raise CheckpointError(f"{names[0]} and {names[1]} are different architectures: {key} is "
                                  f"{tuple(tensor.shape)} in {names[0]} but {tuple(b[key].shape)} in {names[1]}")


def merge_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], alpha: float,
                  names: tuple[str, str] = ("A", "B")) -> dict[str, torch.Tensor]:
    """(1 - alpha) * a + alpha * b for every floating-point tensor, computed in float32 and stored in a's dtype.

    Integer buffers (step counters, position ids) cannot be averaged; they are taken from `b`.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be between 0 (base) and 1 (fine-tuned), not {alpha}")
    check_same_architecture(a, b, names)
    merged = {}
    for key, ta in a.items():
        tb = b[key]
        if ta.is_floating_point():
            mixed = torch.lerp(ta.float(), tb.to(ta.device).float(), alpha)
            merged[key] = mixed.to(ta.dtype)
        else:
            merged[key] = tb.clone()
    return merged


def merge_models(base: nn.Module, finetuned: nn.Module, alpha: float,
                 names: tuple[str, str] = ("base", "fine-tuned")) -> nn.Module:
    """A copy of `base` holding the interpolated weights; both must be the same model type and shape."""
    if type(base) is not type(finetuned):
        raise CheckpointError(f"{names[0]} is a {type(base).__name__} but {names[1]} is a "
                              f"{type(finetuned).__name__}; only models of one kind can be merged")
    act_a = getattr(getattr(base, "config", None), "quick_gelu", None)
    act_b = getattr(getattr(finetuned, "config", None), "quick_gelu", None)
    if act_a != act_b:
        raise CheckpointError(f"{names[0]} and {names[1]} use different activations (quick_gelu {act_a} vs "
                              f"{act_b}); their weights do not mean the same thing")
    merged = copy.deepcopy(base)
    state = merge_weights(base.state_dict(), finetuned.state_dict(), alpha, names)
    merged.load_state_dict(state)
    return merged
