"""OpenAI's released `.pt` files: TorchScript archives (or plain state dicts) in open_clip's key layout.

OpenAI's TorchScript models carry three non-weight entries (`input_resolution`, `context_length`,
`vocab_size`); everything else has open_clip's names, so once `torchscript.read_state` has read the
archive's weights (without running it) the open_clip converter does the rest.
"""

from __future__ import annotations

import torch

OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def is_openai_state(state: dict[str, torch.Tensor]) -> bool:
    """OpenAI's checkpoints are told apart from open_clip's by their metadata entries."""
    return any(key in state for key in OPENAI_METADATA)
