"""PACL: a frozen CLIP plus small vision/text embedders trained so that patches align with text.

Mukhoti et al., "Open Vocabulary Semantic Segmentation with Patch Aligned Contrastive Learning" (CVPR 2023).
Every patch token of the frozen image tower goes through a vision embedder e_v and the pooled text
embedding through a text embedder e_t; the image-text compatibility pools the patches with weights
softmax_i <e_v(v_i), e_t(t)> (`compatibility`; the loss is `clip_pacl.losses.pacl`). Because training only
sees captions, the patch-level similarity that results is what segments images.

For an image with normalised patch embeddings V (N, D) and a normalised text embedding t (D,):
    s = V t                  patch-text similarities (N,)
    a = softmax(s)           patch weights
    p = a^T V                text-conditioned pooled image embedding
    phi = <p, t> / |p|       the compatibility (cosine, since |t| = 1)
The loss needs phi for all B x B pairs. Forming p for every pair would be a (B, B, D) tensor
(or (B, B, N, D) before the sum); instead
    <p, t> = sum_i a_i s_i   and   |p|^2 = a^T G a  with  G = V V^T  (B, N, N), shared by every text,
so the largest tensor is (B, B_chunk, N). Chunks over texts are recomputed in the backward pass
(activation checkpointing) when gradients are needed, so peak memory stays O(B * chunk * N).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_pacl.config import PACLConfig
from clip_pacl.errors import ConfigError
from clip_pacl.models.clip import CLIP
from clip_pacl.tokenizer import Tokenizer


def _compatibility_block(patch_emb: torch.Tensor, gram: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """phi for every (image, text) pair of one text chunk: (B_img, N, D), (B_img, N, N), (C, D) -> (B_img, C)."""
    s = torch.einsum("bnd,cd->bcn", patch_emb, text_emb)  # (B_img, C, N)
    a = s.softmax(dim=-1)  # (B_img, C, N)
    dot = (a * s).sum(dim=-1)  # <p, t>: (B_img, C)
    sq_norm = (a * torch.einsum("bnm,bcm->bcn", gram, a)).sum(dim=-1)  # |p|^2 = a^T G a: (B_img, C)
    return dot / sq_norm.clamp_min(1e-12).sqrt()


def compatibility(patch_emb: torch.Tensor, text_emb: torch.Tensor, chunk_size: int = 256) -> torch.Tensor:
    """phi(x_b, y_c) for all pairs: patch_emb (B, N, D) and text_emb (C, D), both L2-normalised -> (B, C).

    Computed in float32 whatever the input dtype: the softmax-weighted norms lose too much in half precision.
    """
    patch_emb = patch_emb.float()
    text_emb = text_emb.float()
    gram = patch_emb @ patch_emb.transpose(1, 2)  # (B, N, N)
    needs_grad = torch.is_grad_enabled() and (patch_emb.requires_grad or text_emb.requires_grad)
    blocks = []
    for start in range(0, text_emb.shape[0], chunk_size):
        chunk = text_emb[start : start + chunk_size]
        if needs_grad and text_emb.shape[0] > chunk_size:
            blocks.append(checkpoint(_compatibility_block, patch_emb, gram, chunk, use_reentrant=False))
        else:
            blocks.append(_compatibility_block(patch_emb, gram, chunk))
    return torch.cat(blocks, dim=1)


class ResidualEmbedder(nn.Module):
    """A linear branch plus a two-layer MLP branch, summed (the paper's embedder).

    The linear branch starts as the identity when the dims match, so an untrained PACL scores patches
    like the raw CLIP patch tokens do and training refines that instead of starting from noise.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        if in_dim == out_dim:
            nn.init.eye_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.mlp[2].weight, std=0.02 * hidden_dim**-0.5)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return self.linear(x) + self.mlp(x)


class PACL(nn.Module):
    """A frozen CLIP plus trainable vision/text embedders; images are scored against texts by the patch-aligned
    compatibility phi (`similarity` (B, C)) and segmented by per-patch similarity (`patch_similarity`)."""

    model_type = "pacl"
    objectives = ("pacl",)  # the objectives it trains under (`clip-pacl train --objective`)

    def __init__(self, clip: CLIP, config: PACLConfig | None = None):
        super().__init__()
        self.config = config or PACLConfig()
        self.clip = clip
        d = clip.embed_dim
        hidden = self.config.hidden_dim or 4 * d
        out = self.config.out_dim or d
        self.vision_embedder = ResidualEmbedder(d, hidden, out)
        self.text_embedder = ResidualEmbedder(d, hidden, out)
        self.logit_scale = nn.Parameter(torch.tensor(float(self.config.init_logit_scale)))
        self.logit_bias = None
        self._unfrozen = tuple(self._unfreeze(self.config.unfreeze_last_n_blocks))  # a tuple: not re-registered
        self.train(self.training)

    # ------------------------------------------------------------------ freezing
    def _unfreeze(self, n: int) -> list[nn.Module]:
        """Freeze the CLIP, then unfreeze the image tower's last `n` layer groups (`image_layer_groups`: the last ViT
        blocks or ResNet stages, the last with the head that maps them to patch tokens)."""
        self.clip.requires_grad_(False)
        if n <= 0:
            return []
        groups = self.clip.image_layer_groups()[1:]  # the stem is not a block
        if n > len(groups):
            raise ConfigError(f"unfreeze_last_n_blocks={n} but the image tower has {len(groups)} blocks")
        items = [item for group in groups[-n:] for item in group]
        for item in items:
            item.requires_grad_(True)
        return [m for m in items if isinstance(m, nn.Module)]

    def train(self, mode: bool = True) -> PACL:
        """Frozen CLIP parts stay in eval mode (no dropout, frozen BatchNorm statistics)."""
        super().train(mode)
        self.clip.eval()
        for m in self._unfrozen:
            m.train(mode)
        return self

    @property
    def vision_frozen(self) -> bool:
        """True when no image-tower weight trains, so patch tokens can be precomputed (--cache-features)."""
        return self.config.unfreeze_last_n_blocks == 0

    # ------------------------------------------------------------------ properties and preprocessing (the CLIP's)
    @property
    def image_size(self) -> int:
        """Side of the square input images (the base CLIP's)."""
        return self.clip.image_size

    @property
    def context_length(self) -> int:
        """Token ids per text (the base CLIP's)."""
        return self.clip.context_length

    @property
    def embed_dim(self) -> int:
        """Width D of the embedders' output space."""
        return self.vision_embedder.linear.out_features

    @property
    def grid_size(self) -> int:
        """Patch tokens per side at `image_size`."""
        return self.clip.config.vision.grid_size

    @property
    def patch_stride(self) -> int:
        """Pixels per patch along each side (the base CLIP's)."""
        return self.clip.patch_stride

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (gh, gw) patch grid an image of this size gives (`patch_embeddings` has gh * gw rows)."""
        return self.clip.patch_grid(height, width)

    def get_tokenizer(self) -> Tokenizer:
        """The base CLIP's tokenizer."""
        return self.clip.get_tokenizer()

    def trim_text_padding(self, tokens: torch.Tensor, multiple: int = 1) -> torch.Tensor:
        """Token ids cut as the base CLIP's text tower allows (`CLIP.trim_text_padding`)."""
        return self.clip.trim_text_padding(tokens, multiple)

    def image_transform(self, train: bool = False, image_size: int | None = None) -> Callable:
        """The base CLIP's preprocess (or training augmentation)."""
        return self.clip.image_transform(train, image_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing in the base CLIP (where unfrozen blocks train)."""
        self.clip.set_grad_checkpointing(enable)

    # ------------------------------------------------------------------ the frozen CLIP's features
    def clip_patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The CLIP's patch tokens (B, N, D_clip) of pixels (B, 3, H, W), without the pooled token; no graph when
        the image tower is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.vision_frozen):
            return self.clip.encode_image_tokens(images, dense=self.config.patch_tokens)[:, 1:]

    def clip_text_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """The frozen CLIP's pooled text embedding (B, D_clip) of token ids (B, L)."""
        with torch.no_grad():
            return self.clip.encode_text(tokens)

    def set_tower_dtype(self, dtype: torch.dtype) -> PACL:
        """The frozen CLIP's towers in `dtype` for inference (`CLIP.set_tower_dtype`); the embedders stay float32."""
        self.clip.set_tower_dtype(dtype)
        return self

    # ------------------------------------------------------------------ encoders
    def embed_patches(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Normalised e_v (B, N, D) of CLIP patch tokens (B, N, D_clip)."""
        return F.normalize(self.vision_embedder(patch_tokens), dim=-1)

    def embed_text(self, text_embeddings: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """e_t (B, D) of CLIP text embeddings (B, D_clip)."""
        x = self.text_embedder(text_embeddings)
        return F.normalize(x, dim=-1) if normalize else x

    def patch_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised e_v per patch (B, N, D) of pixels (B, 3, H, W)."""
        return self.embed_patches(self.clip_patch_tokens(images))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """e_t (B, D) of token ids (B, L)."""
        return self.embed_text(self.clip_text_embeddings(tokens), normalize)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """A text-independent image embedding (B, D): the mean of the normalised patch embeddings.

        PACL's own pooling depends on the text (`similarity`); this is for places that need one vector
        per image, such as a retrieval index. For scoring against texts prefer `similarity`.
        """
        x = self.patch_embeddings(images).mean(dim=1)
        return F.normalize(x, dim=-1) if normalize else x

    def similarity(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """phi for every (image, class) pair (B, C); text_features (C, D) from `encode_text`."""
        patches = self.patch_embeddings(images) / self.config.pool_temperature
        return compatibility(patches, F.normalize(text_features, dim=-1))

    def patch_similarity(self, images: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Per-patch similarity s_i to each class (B, C, gh, gw): what segmentation upsamples."""
        patches = self.patch_embeddings(images)  # (B, N, D)
        gh, gw = self.patch_grid(*images.shape[-2:])
        scores = torch.einsum("bnd,cd->bcn", patches, F.normalize(text_features, dim=-1).to(patches.dtype))
        return scores.reshape(scores.shape[0], scores.shape[1], gh, gw)

    # ------------------------------------------------------------------ training
    def loss_features(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch embeddings (B, N, D) of norm 1 / pool_temperature, normalised text embeddings (B, D)) for the
        loss, from pixels (B, 3, H, W) and token ids (B, L).

        phi is a cosine, so scaling every patch leaves it unchanged except through the pooling softmax, where s_i
        becomes s_i / pool_temperature: the temperature rides on the features and the loss stays a pure function.
        """
        return self.loss_features_from_cache(self.clip_patch_tokens(images), self.clip_text_embeddings(texts))

    def loss_features_from_cache(self, patch_tokens: torch.Tensor,
                                 text_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`loss_features` from precomputed CLIP features (`clip_pacl.train.feature_cache`): patch tokens
        (B, N, D_clip) and text embeddings (B, D_clip)."""
        patches = self.embed_patches(patch_tokens) / self.config.pool_temperature
        return patches, self.embed_text(text_embeddings, normalize=True)
