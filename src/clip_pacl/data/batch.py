"""What a training batch holds, said by its type instead of guessed from dtypes.

`TokenBatch`: pixels and token ids of caption pairs (every caption dataset). `FeatureBatch`: a frozen CLIP's patch
tokens and text embeddings of the same pairs, precomputed once (`clip-pacl train --cache-features`, PACL). A dataset
names its kind in `batch_type` (default: `TokenBatch`); the loader's `collate_skip_bad` stacks its items into one,
and the training loop hands `inputs` to the model's `loss_features` (a cached-feature model's takes features).
Both carry the loader's counts of unreadable items, so the loop can stop when too many images fail.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True, kw_only=True)
class _Batch:
    n_bad: int  # items of this batch the loader dropped (unreadable images)
    n_total: int  # items the sampler asked for, n_bad included

    def __len__(self) -> int:
        """Pairs in the batch (0 when every image was unreadable: the loop skips it)."""
        return self.inputs[0].shape[0]

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(image side, text side): what the model's `loss_features` takes."""
        raise NotImplementedError

    def _map(self, fn):
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def pin_memory(self):
        """The tensors in pinned host memory (DataLoader's `pin_memory` calls this)."""
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device | str, non_blocking: bool = False):
        """The tensors on `device` (Lightning moves batches with this)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    @classmethod
    def collate(cls, good: list[tuple[torch.Tensor, torch.Tensor]], n_bad: int):
        """The stacked batch of the readable items `good` (items are (image side, text side) pairs)."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class TokenBatch(_Batch):
    """B caption pairs as pixels and token ids."""

    images: torch.Tensor  # (B, 3, H, W) preprocessed pixels
    texts: torch.Tensor  # (B, L) token ids (long)

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images, self.texts

    @classmethod
    def collate(cls, good: list[tuple[torch.Tensor, torch.Tensor]], n_bad: int) -> TokenBatch:
        n_total = len(good) + n_bad
        if not good:
            return cls(images=torch.empty(0, 3, 0, 0), texts=torch.empty(0, 0, dtype=torch.long), n_bad=n_bad,
                       n_total=n_total)
        return cls(images=torch.stack([g[0] for g in good]), texts=torch.stack([g[1] for g in good]).long(),
                   n_bad=n_bad, n_total=n_total)


@dataclass(frozen=True, kw_only=True)
class FeatureBatch(_Batch):
    """B caption pairs as a frozen CLIP's features (`clip_pacl.train.feature_cache`)."""

    patch_tokens: torch.Tensor  # (B, N, D_clip) float
    text_embeddings: torch.Tensor  # (B, D_clip) float

    @property
    def inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.patch_tokens, self.text_embeddings

    @classmethod
    def collate(cls, good: list[tuple[torch.Tensor, torch.Tensor]], n_bad: int) -> FeatureBatch:
        n_total = len(good) + n_bad
        if not good:
            return cls(patch_tokens=torch.empty(0, 0, 0), text_embeddings=torch.empty(0, 0), n_bad=n_bad,
                       n_total=n_total)
        return cls(patch_tokens=torch.stack([g[0] for g in good]), text_embeddings=torch.stack([g[1] for g in good]),
                   n_bad=n_bad, n_total=n_total)
