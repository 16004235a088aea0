"""Search an image index by text or by example image, with the model that built it."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

import clip_pacl
from clip_pacl.checkpoint.io import set_precision
from clip_pacl.data import load_image
from clip_pacl.encode import encode_texts, model_device
from clip_pacl.errors import DataError
from clip_pacl.models.quantize import quantize as quantize_model
from clip_pacl.preprocess import model_transform
from clip_pacl.retrieval.build import check_model
from clip_pacl.retrieval.filters import search_prefix
from clip_pacl.retrieval.store import ImageIndex, SearchHit


def load_index_model(
    index: ImageIndex, model: str | Path | None = None, device: str | torch.device | None = None,
    force: bool = False, quantize: str | None = None, random_weights: bool | None = None,
    precision: str | None = None,
) -> torch.nn.Module:
    """The model recorded in the index's meta.json, or `model` when given; checked against the index's dim
    and (unless `force`) against the weights and preprocessing that built it.

    `quantize="int8"` returns it int8-quantized, `precision` (`load`'s) at that precision: both checked as
    float32 first, since the fingerprint is the source weights'.
    An index built from a preset (random weights) cannot be searched by reloading the preset, which would
    draw new random weights: that case asks for `--model`. `random_weights` is `clip_pacl.load`'s, for a preset
    given as `model` (None warns, False refuses).
    """
    source = model if model is not None else index.meta.get("model")
    if source is None:
        raise DataError("the index does not record its model; pass --model")
    if model is None and not index.meta.get("model_has_weights", True):
        raise DataError(f"the index was built with '{source}', a randomly initialised model that cannot be "
                        f"loaded again; pass --model with a checkpoint")
    loaded = clip_pacl.load(source, device=device, random_weights=random_weights).eval()
    if loaded.embed_dim != index.embed_dim:
        raise DataError(f"model '{source}' embeds into {loaded.embed_dim} dimensions but the index holds "
                        f"{index.embed_dim}-d embeddings")
    if not force:
        check_model(index, loaded)
    return set_precision(quantize_model(loaded, quantize, inplace=True), precision)


def search_text(index: ImageIndex, model: torch.nn.Module, queries: str | list[str], k: int = 10,
                backend: str = "auto", prefix: str | None = None, **ann_settings: int | None) -> list[list[SearchHit]]:
    """The k best images for each text query, best first; with `prefix`, the k best whose path starts with it.

    `ann_settings`: nprobe, ef_search, rerank, as for `ImageIndex.search`. A `prefix` search is exact over the
    matching rows (`retrieval/filters.py`): `backend` and `ann_settings` do not apply to it and are ignored.
    """
    queries = [queries] if isinstance(queries, str) else list(queries)
    if not all(q.strip() for q in queries):
        raise DataError("a text query is empty")
    return _search(index, encode_texts(model, queries), k, backend, prefix, ann_settings)


def search_image(index: ImageIndex, model: torch.nn.Module, image: str | Path | Image.Image, k: int = 10,
                 backend: str = "auto", prefix: str | None = None, **ann_settings: int | None) -> list[SearchHit]:
    """The k images most similar to an example image (a path or a PIL image), best first (with `prefix`: among
    the images whose path starts with it, exactly; `ann_settings` as for `search_text`)."""
    pil = image if isinstance(image, Image.Image) else load_image(Path(image))
    pixels = model_transform(model)(pil.convert("RGB"))[None]  # (1, 3, H, W): the model's own preprocessing
    with torch.inference_mode():
        features = model.encode_image(pixels.to(model_device(model)), normalize=True)  # (1, D)
    return _search(index, features, k, backend, prefix, ann_settings)[0]


def search_by_features(index: ImageIndex, features: torch.Tensor, k: int, prefix: str | None = None,
                       ann_settings: dict[str, int | None] | None = None) -> list[SearchHit]:
    """The k best images for one query's features (1, D) (what `search_image` does once it has them)."""
    return _search(index, features, k, "auto", prefix, ann_settings or {})[0]


def _search(index: ImageIndex, features: torch.Tensor, k: int, backend: str, prefix: str | None,
            ann_settings: dict[str, int | None]) -> list[list[SearchHit]]:
    if prefix is None:
        return index.search(features, k, backend, **ann_settings)
    return search_prefix(index, features, k, prefix)  # exact over the matching rows (`retrieval/filters.py`)


def search_encoder(index: ImageIndex, model: torch.nn.Module, force: bool = False) -> torch.nn.Module:
    """What embeds queries into `index`: `model` itself, or a PACL model's base CLIP when that CLIP built the index
    (its weights fingerprint and preprocessing match meta.json's), so that one server searches an index with the
    CLIP and segments with the PACL trained on it. Refused (DataError) when neither fits; `force` skips the
    fingerprint check (the dimension must still fit)."""
    base = getattr(model, "clip", None)
    candidates = [model] + ([base] if isinstance(base, torch.nn.Module) and base is not model else [])
    refusal = None
    for encoder in candidates:
        if encoder.embed_dim != index.embed_dim:
            continue
        if force:
            return encoder
        try:
            check_model(index, encoder)
        except DataError as e:
            refusal = e
            continue
        return encoder
    if refusal is not None:
        raise refusal
    raise DataError(f"the model embeds into {model.embed_dim} dimensions but the index holds {index.embed_dim}-d "
                    f"embeddings (was it built with another model?)")
