"""What the web app does, without HTTP: search, classify, segment and thumbnails over one loaded model.

Kept apart from the FastAPI routes so that it can be used (and tested) from Python, and so that the
rules that make the server safe live in one place:
  - user text is only ever text: labels and templates are parsed from the request, never read from a
    file named by the request (the CLI's `--classes FILE` convenience would be a file-disclosure hole here);
  - images are served by index id only (`thumbnail(i)`), from the paths the operator indexed, and named
    by their path relative to the indexed folder: no answer carries an absolute path of the server's files;
    a search's path prefix is one of those relative paths too (it only narrows the indexed images);
  - one inference at a time: torch already uses every core for one call, and the model is shared.
"""

from __future__ import annotations

import base64
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clip_pacl.data.images import decode_cost, decode_image_file, load_image
from clip_pacl.encode import encode_texts, model_device
from clip_pacl.errors import ClipPaclError, DataError
from clip_pacl.preprocess import model_transform
from clip_pacl.retrieval.filters import check_prefix
from clip_pacl.retrieval.search import search_by_features, search_text
from clip_pacl.retrieval.store import ImageIndex, SearchHit
from clip_pacl.retrieval.wds_images import read_sample_image
from clip_pacl.segmentation.overlay import class_colors, overlay_image
from clip_pacl.segmentation.predict import DEFAULT_TEMPLATES, METHODS, NO_CLASS, _check_method, default_method, segment
from clip_pacl.zeroshot.classifier import class_probabilities
from clip_pacl.zeroshot.templates import OPENAI_IMAGENET_TEMPLATES, TEMPLATE_SETS, check_template, format_prompt
from clip_pacl_app.web.confine import Confinement
from clip_pacl_app.web.limits import DecodeBudget, InferenceQueue, Limits

MAX_LABELS = 100
MAX_LABEL_CHARS = 100
MAX_TEMPLATES = 100
MAX_K = 100
MAX_PREFIX_CHARS = 1000
# Uploads are small files that may still decode to huge images (a 10 MB PNG of one colour can be 30k x 30k).
MAX_UPLOAD_PIXELS = Limits.max_pixels
THUMBNAIL_SIDE = 256
# Segmentation works on the upload shrunk to this longer side: the patch grid is far coarser anyway, and it
# bounds the label map, the overlay and its PNG whatever the upload's size.
MAX_SEGMENT_SIDE = 1024
THUMBNAIL_CACHE = 512  # JPEGs of at most THUMBNAIL_SIDE a side: a few tens of KB each


class NotFound(ClipPaclError):
    """The request names something the server does not have (no index loaded, no such indexed image)."""


def parse_labels(text: str | None) -> list[str]:
    """Comma-separated class names, stripped; empty, repeated, too many or too long ones are refused."""
    labels = [part.strip() for part in (text or "").split(",")]
    labels = [label for label in labels if label]
    if not labels:
        raise DataError("no labels given (send them comma-separated, e.g. 'cat, dog, car')")
    if len(labels) > MAX_LABELS:
        raise DataError(f"at most {MAX_LABELS} labels per request (got {len(labels)})")
    long = [label for label in labels if len(label) > MAX_LABEL_CHARS]
    if long:
        raise DataError(f"label '{long[0][:40]}...' is longer than {MAX_LABEL_CHARS} characters")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise DataError(f"labels are repeated: {', '.join(repeated)}")
    return labels


def parse_templates(text: str | None, default: Sequence[str]) -> list[str]:
    """A named set (`openai`, `simple`) or literal templates, one per line, each with `{}` for the class name."""
    text = (text or "").strip()
    if not text:
        return list(default)
    if text in TEMPLATE_SETS:
        return list(TEMPLATE_SETS[text])
    templates = [line.strip() for line in text.splitlines() if line.strip()]
    if len(templates) > MAX_TEMPLATES:
        raise DataError(f"at most {MAX_TEMPLATES} templates per request (got {len(templates)})")
    return [check_template(t) for t in templates]


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _LRU:
    """A small least-recently-used cache (thread-safe; values are computed outside the lock)."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def peek(self, key: Any) -> Any:
        """The value for `key` (now the most recently used) or None."""
        with self._lock:
            if key not in self._items:
                return None
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get(self, key: Any, compute) -> Any:
        value = self.peek(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value


class WebService:
    """One model (and optionally one image index), and the answers the web endpoints give, within `limits`."""

    def __init__(self, model: nn.Module, index: ImageIndex | None = None, model_name: str = "",
                 index_name: str = "", search_settings: dict[str, int | None] | None = None, *,
                 limits: Limits | None = None, search_model: nn.Module | None = None,
                 trained_on: dict[str, Any] | None = None):
        """`search_settings`: nprobe, ef_search, rerank for an index with an approximate faiss index (None: the
        values saved with it). `search_model`: what embeds queries into the index (default: `model`, or a PACL
        model's base CLIP when that is what fits the index). `trained_on`: what the model was trained on, shown
        by the page (`clip_pacl.train.record`)."""
        self.model = model.eval()
        self.search_model = (search_model or _fitting_encoder(model, index)).eval()
        if index is not None and index.embed_dim != self.search_model.embed_dim:
            raise DataError(f"the model embeds into {self.search_model.embed_dim} dimensions but the index holds "
                            f"{index.embed_dim}-d embeddings (was it built with another model?)")
        self.search_settings = search_settings or {}
        if index is not None:
            index.uses_ann("auto", **self.search_settings)  # settings that cannot apply fail at start
        self.limits = limits or Limits()
        self.index = index
        self.model_name = model_name
        self.index_name = index_name
        self.trained_on = trained_on
        self._ids = {path: i for i, path in enumerate(index.paths)} if index is not None else {}
        self._root = shown_root(index.paths) if index is not None else None
        self._shown_paths = relative_paths(index.paths) if index is not None else []
        self._confined = Confinement.of(index) if index is not None else None
        self._transform = model_transform(model)
        self._search_transform = model_transform(self.search_model)
        self._queue = InferenceQueue(self.limits.queue_depth, self.limits.retry_after_s)
        self._budget = DecodeBudget(self.limits.decode_budget_bytes, self.limits.wait_s, self.limits.retry_after_s)
        self._class_embeddings = _LRU(self.limits.cache_entries)  # (encoder, templates, label) -> (D,)
        self._thumbnails = _LRU(THUMBNAIL_CACHE)

    # ------------------------------------------------------------------------------------------ info
    def segment_methods(self) -> list[str]:
        """The segmentation methods this model supports (PACL: all three; a CLIP: the two baselines)."""
        usable = []
        for method in METHODS:
            try:
                _check_method(self.model, method)
            except ClipPaclError:
                continue
            usable.append(method)
        return usable

    def health(self) -> dict[str, Any]:
        index = None if self.index is None else {
            "name": _public_name(self.index_name), "count": len(self.index),
            "searched_with": "base CLIP" if self.search_model is not self.model else "model"}
        methods = self.segment_methods()
        limits = self.limits
        return {"status": "ok", "model": _public_name(self.model_name), "model_type": type(self.model).__name__,
                "embed_dim": int(self.model.embed_dim), "image_size": int(self.model.image_size),
                "device": str(model_device(self.model)), "index": index, "segment_methods": methods,
                "default_segment_method": default_method(self.model) if methods else None,
                "trained_on": self.trained_on,
                "limits": {"max_prompts": limits.max_prompts, "max_pixels": limits.max_pixels,
                           "decode_budget_mb": limits.decode_budget_bytes // 2**20, "queue": limits.queue_depth}}

    # ------------------------------------------------------------------------------------------ requests
    def admitted(self):
        """The context of one request that uses the model: 503 (`Busy`) when the queue is full."""
        return self._queue.admitted()

    def decode(self, upload: IO[bytes], name: str, then: Callable[[Image.Image], Any]) -> Any:
        """`then(rgb)` of an uploaded image, decoded within the shared budget (`web/limits.py`)."""
        label = f"upload '{name[:100]}'"
        return decode_image_file(upload, label, self.limits.max_pixels, self._reserve(label), then)

    def _reserve(self, name: str):
        return lambda header: self._budget.reserve(decode_cost(header.width, header.height, header.mode), name)

    def query_pixels(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, H, W): an image as the search model's input (what `then` of a search upload returns)."""
        return self._search_transform(image)[None]

    def model_pixels(self, image: Image.Image) -> torch.Tensor:
        """(1, 3, H, W): an image as the model's input (what `then` of a classify upload returns)."""
        return self._transform(image)[None]

    # ------------------------------------------------------------------------------------------ search
    def require_index(self) -> ImageIndex:
        if self.index is None:
            raise NotFound("no image index is loaded; start the server with --index IDX "
                           "(made by `clip-pacl index build`) to search")
        return self.index

    def _results(self, hits: list[SearchHit], k: int) -> list[dict[str, Any]]:
        ids = [self._ids[hit.path] for hit in hits]
        kept = [(i, hit) for i, hit in zip(ids, hits) if self._confined.servable(i)][:k]
        return [{"id": i, "path": self._shown_paths[i], "score": hit.score, "thumbnail": f"/thumb/{i}",
                 **({"metadata": hit.metadata} if hit.metadata is not None else {})}
                for i, hit in kept]

    def search_text(self, query: str, k: int, prefix: str | None = None) -> list[dict[str, Any]]:
        """The k best images for `query`; with `prefix` (a shown, relative path prefix) among those under it, exactly
        (`search_settings` apply to the searches without one). Rows outside the indexed root are never listed."""
        index = self.require_index()
        query = (query or "").strip()
        if not query:
            raise DataError("the search query is empty")
        _check_k(k)
        absolute = self._absolute_prefix(prefix)
        with self._queue.turn():
            hits = search_text(index, self.search_model, query, self._confined.widened(k), prefix=absolute,
                               **self.search_settings)[0]
        return self._results(hits, k)

    def search_image(self, image: Image.Image | torch.Tensor, k: int, prefix: str | None = None
                     ) -> list[dict[str, Any]]:
        """Like search_text for an example image (a PIL image, or `query_pixels` of one)."""
        index = self.require_index()
        _check_k(k)
        absolute = self._absolute_prefix(prefix)
        pixels = image if isinstance(image, torch.Tensor) else self.query_pixels(image)
        with self._queue.turn(), torch.inference_mode():
            features = self.search_model.encode_image(pixels.to(model_device(self.search_model)), normalize=True)
            hits = search_by_features(index, features, self._confined.widened(k), absolute, self.search_settings)
        return self._results(hits, k)

    def _absolute_prefix(self, prefix: str | None) -> str | None:
        """A prefix of the shown (relative) paths as a prefix of the indexed ones; empty or None: no filter."""
        if not prefix:
            return None
        if len(check_prefix(prefix)) > MAX_PREFIX_CHARS:
            raise DataError(f"the path prefix is {len(prefix)} characters long; at most {MAX_PREFIX_CHARS} are "
                            f"accepted")
        if self._root is None:
            raise DataError("this index's images have no common folder, so they cannot be filtered by path prefix")
        return self._root.rstrip(os.sep) + os.sep + prefix  # shown path = indexed path less "ROOT/" (posix)

    def thumbnail(self, image_id: int) -> bytes:
        """A JPEG of at most THUMBNAIL_SIDE pixels a side of the `image_id`-th indexed image (only of a regular file
        inside the indexed root, decoded within the shared budget)."""
        index = self.require_index()
        if not 0 <= image_id < len(index):
            raise NotFound(f"there is no indexed image {image_id} (the index holds {len(index)})")
        if not self._confined.servable(image_id):
            raise NotFound(f"indexed image {image_id} is outside the indexed folder and is not served")
        webdataset = (index.meta.get("images") or {}).get("format") == "wds"  # paths are SHARD#KEY
        return self._thumbnails.get(image_id, lambda: self._jpeg_thumbnail(index.paths[image_id], image_id,
                                                                           webdataset))

    def _jpeg_thumbnail(self, path: str, image_id: int, webdataset: bool) -> bytes:
        try:
            if webdataset:
                return _jpeg(read_sample_image(path))
            return load_image(Path(path), reserve=self._reserve_thumbnail(f"indexed image {image_id}"), then=_jpeg)
        except DataError:
            raise NotFound(f"indexed image {image_id} can no longer be read") from None

    def _reserve_thumbnail(self, name: str):
        def reserve(header: Image.Image):
            header.draft(None, (2 * THUMBNAIL_SIDE, 2 * THUMBNAIL_SIDE))  # a JPEG decodes at 1/2-1/8 scale
            return self._budget.reserve(decode_cost(header.width, header.height, header.mode), name)
        return reserve

    # ------------------------------------------------------------------------------------------ classify
    def classify(self, image: Image.Image | torch.Tensor, labels: Sequence[str],
                 templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES) -> list[dict[str, Any]]:
        """Every label with its probability, most probable first (the numbers `clip-pacl zeroshot` prints)."""
        self.limits.check_prompts(len(labels), len(templates))
        pixels = image if isinstance(image, torch.Tensor) else self.model_pixels(image)  # (1, 3, H, W)
        classifier = self.class_embeddings(self.model, labels, templates)  # (C, D)
        with self._queue.turn():
            probs = class_probabilities(self.model, pixels.to(model_device(self.model)), classifier)[0].cpu()  # (C,)
        order = probs.argsort(descending=True).tolist()
        return [{"label": labels[i], "probability": float(probs[i])} for i in order]

    def class_embeddings(self, encoder: nn.Module, labels: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """(C, D) prompt-ensembled class embeddings, as `build_classifier` makes them, with the prompts encoded in
        turns of `limits.prompt_chunk` (so a big prompt set does not hold the model) and each class's embedding
        cached per (encoder, templates, label) in a bounded LRU."""
        templates = tuple(check_template(t) for t in templates)
        keys = [(id(encoder), templates, label) for label in labels]
        found = {key: self._class_embeddings.peek(key) for key in keys}
        missing = [key[2] for key in keys if found[key] is None]
        prompts = [format_prompt(t, label) for label in missing for t in templates]
        chunk = self.limits.prompt_chunk
        features = []  # (b, D) each
        for start in range(0, len(prompts), chunk):
            with self._queue.turn():
                features.append(encode_texts(encoder, prompts[start:start + chunk], batch_size=chunk))
        if missing:
            means = F.normalize(torch.cat(features).view(len(missing), len(templates), -1).mean(dim=1), dim=-1)
            for label, row in zip(missing, means):
                found[(id(encoder), templates, label)] = row
                self._class_embeddings.put((id(encoder), templates, label), row)
        return torch.stack([found[key] for key in keys])  # (C, D)

    # ------------------------------------------------------------------------------------------ segment
    def segment(self, image: Image.Image | tuple[Image.Image, tuple[int, int]], labels: Sequence[str],
                templates: Sequence[str] = DEFAULT_TEMPLATES, method: str | None = None,
                background_threshold: float | None = None) -> dict[str, Any]:
        """Per-label pixel fractions, colours (`#rrggbb`, for the page's legend) and a PNG overlay (data URL) in
        those colours, as `clip-pacl segment` draws, on the image shrunk to MAX_SEGMENT_SIDE (`size` is the
        upload's own; a `segment_input` of an upload is taken as it is)."""
        method = method or default_method(self.model)
        self.limits.check_prompts(len(labels), len(templates))
        work, size = image if isinstance(image, tuple) else self.segment_input(image)
        self.limits.check_patch_scores(len(labels), self._patches(work))
        text_features = self.class_embeddings(_check_method(self.model, method), labels, templates)  # (C, D)
        with self._queue.turn(), torch.inference_mode():
            result = segment(self.model, work, labels, templates=templates, text_features=text_features,
                             background_threshold=background_threshold, method=method, keep_scores=False)
        fractions = result.fractions()
        overlay = overlay_image(work, result.label_map, labels, legend=False)
        colors = {label: "#{:02x}{:02x}{:02x}".format(*rgb) for label, rgb in zip(labels, class_colors(labels))}
        return {"method": method, "size": list(size), "fractions": fractions, "colors": colors,
                "unassigned": float((result.label_map == NO_CLASS).mean()), "background": result.background.to_dict(),
                "overlay": png_data_url(overlay)}

    @staticmethod
    def segment_input(image: Image.Image) -> tuple[Image.Image, tuple[int, int]]:
        """(the image shrunk to MAX_SEGMENT_SIDE, its own size): what `then` of a segment upload returns (a copy when
        it already fits: the decoded image itself is freed once `then` returns)."""
        work = _shrunk(image, MAX_SEGMENT_SIDE)
        return (work.copy() if work is image else work), image.size

    def _patches(self, image: Image.Image) -> int:
        """Patch-grid cells segmentation scores for `image` (shorter side to the model's input size)."""
        scale = self.model.image_size / min(image.size)
        stride = self.model.patch_stride
        return max(1, round(image.width * scale / stride)) * max(1, round(image.height * scale / stride))


def _fitting_encoder(model: nn.Module, index: ImageIndex | None) -> nn.Module:
    """What embeds queries into `index`: the model, or a PACL model's base CLIP when only that one's dim fits."""
    base = getattr(model, "clip", None)
    if index is not None and model.embed_dim != index.embed_dim and isinstance(base, nn.Module) \
            and base.embed_dim == index.embed_dim:
        return base
    return model


def _jpeg(image: Image.Image) -> bytes:
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def shown_root(paths: Sequence[str]) -> str | None:
    """The deepest folder that holds every indexed path (answers show paths relative to it), or None."""
    try:
        return os.path.commonpath([os.path.dirname(p) for p in paths])
    except ValueError:  # no paths, or (Windows) paths on several drives
        return None


def relative_paths(paths: Sequence[str]) -> list[str]:
    """Indexed paths relative to the deepest folder that holds them all, with '/' separators (without one: the
    file names)."""
    root = shown_root(paths)
    if root is None:
        return [Path(p).name for p in paths]
    return [Path(os.path.relpath(p, root)).as_posix() for p in paths]


def _public_name(name: str) -> str:
    """A model or index name for answers: a path given by the operator is shown by its last part only."""
    return Path(name).name if os.path.isabs(name) else name


def _check_k(k: int) -> None:
    if not 1 <= k <= MAX_K:
        raise DataError(f"k must be between 1 and {MAX_K} (got {k})")


_DIGITS = re.compile(r"[0-9]{1,12}")


def parse_image_id(text: str) -> int:
    """A thumbnail id from the URL: plain ASCII digits only, so no path, sign or other spelling gets through."""
    if not _DIGITS.fullmatch(text):
        raise NotFound(f"'{text[:40]}' is not an indexed image id")
    return int(text)


def _shrunk(image: Image.Image, side: int) -> Image.Image:
    """The image with its longer side at most `side` (aspect kept); the image itself when it already fits."""
    scale = side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.BICUBIC, reducing_gap=2.0)
