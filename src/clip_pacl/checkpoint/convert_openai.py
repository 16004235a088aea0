"""OpenAI's released `.pt` files: TorchScript archives (or plain state dicts) in open_clip's key layout.

OpenAI's TorchScript models carry three non-weight entries (`input_resolution`, `context_length`,
`vocab_size`); everything else has open_clip's names, so after reading the archive the open_clip
converter does the rest.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive is a zip with compiled code (`code/`, `constants.pkl`); `torch.save` zips have neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def load_torchscript_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a TorchScript archive. TorchScript's loader runs no arbitrary pickle code."""
    with warnings.catch_warnings():  # torch deprecates TorchScript, but OpenAI's files are TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    return dict(module.state_dict())


def is_openai_state(state: dict[str, torch.Tensor]) -> bool:
    """OpenAI's checkpoints are told apart from open_clip's by their metadata entries."""
    return any(key in state for key in OPENAI_METADATA)
