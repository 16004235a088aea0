"""Per-sample helpers shared by the map-style caption dataset (`data/dataset.py`) and the webdataset stream
(`data/wds.py`): reproducible augmentation seeds and 1-D token rows."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any

import torch

Transform = Callable[[Any], torch.Tensor]
Tokenizer = Callable[[str], torch.Tensor]


def mix_seed(*values: int | str) -> int:
    """A well-spread 63-bit seed from several values (seed, epoch, index), stable across processes."""
    digest = hashlib.blake2b(b",".join(str(v).encode() for v in values), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def seeded_call(fn: Callable[[Any], Any], x: Any, seed: int | None) -> Any:
    """fn(x) with torch's and Python's global RNGs seeded, leaving the caller's RNG state untouched."""
    if seed is None:
        return fn(x)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues CUDA seeding, slowly
        state = random.getstate()
        random.seed(seed)
        try:
            return fn(x)
        finally:
            random.setstate(state)


def tokens_1d(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """One caption's token ids (L,), whether the tokenizer returns (L,) or (1, L)."""
    tokens = tokenizer(text)
    return tokens[0] if tokens.dim() == 2 else tokens  # (L,)
