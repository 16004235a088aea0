"""The server's resource policy, in one place: what one request may cost, and what all of them together may hold.

Every request's cost is checked against a stated limit before any work starts, and refused with a 4xx naming
the limit (`LimitExceeded`):
  - prompts: labels x templates, encoded by the text tower (`max_prompts`);
  - pixels: an image's header is read first (PIL opens lazily), and the bytes its decode needs
    (`clip_pacl.data.images.decode_cost`: width x height x bytes per pixel of its mode, 16-bit and alpha modes
    included) must fit the shared decode budget;
  - patches scored: classes x patch-grid cells of a segmentation (`max_patch_scores`).

What requests hold together is bounded too:
  - `DecodeBudget`: decoded pixels of every request in flight share one byte budget (`decode_budget_bytes`); a
    decode waits for its share (at most `wait_s`, then 503) and holds it until the image is reduced to what the
    model needs. Peak memory is therefore about: the process at rest + `decode_budget_bytes` + the inference
    working set of one request + the caches (README, "Web page").
  - `InferenceQueue`: model calls run one at a time, first come first served, in turns of at most
    `prompt_chunk` prompts (or one image), so a small request waits at most one turn of each request admitted
    before it, never a whole big one; at most `queue_depth` requests are admitted at once, beyond that the
    answer is 503 with `Retry-After`.
  - the classifier cache holds at most `cache_entries` class embeddings (`web/service.py`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from clip_pacl.errors import ClipPaclError

MB = 2**20


@dataclass(frozen=True)
class Limits:
    """The stated limits of one server (`clip-pacl serve` flags in brackets)."""

    max_prompts: int = 2000  # labels x templates per request [--max-prompts]
    prompt_chunk: int = 64  # prompts encoded per turn of the inference queue [--prompt-chunk]
    max_pixels: int = 40_000_000  # pixels of one uploaded image [--max-pixels]
    decode_budget_bytes: int = 1024 * MB  # decoded pixels of all requests in flight [--decode-budget-mb]
    max_patch_scores: int = 4_000_000  # classes x patches of one segmentation
    queue_depth: int = 8  # requests admitted to the model at once (decoding, waiting or running) [--queue]
    wait_s: float = 30.0  # longest wait for a share of the decode budget before answering 503
    retry_after_s: int = 5  # the Retry-After of a 503
    cache_entries: int = 4096  # class embeddings kept (per label, template set and encoder)

    def __post_init__(self) -> None:
        for name in ("max_prompts", "prompt_chunk", "max_pixels", "decode_budget_bytes", "max_patch_scores",
                     "queue_depth", "cache_entries", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.wait_s <= 0:
            raise ValueError(f"wait_s must be positive, got {self.wait_s}")

    def check_prompts(self, labels: int, templates: int) -> None:
        if labels * templates > self.max_prompts:
            raise LimitExceeded(f"this request asks for {labels * templates} prompt encodings ({labels} labels x "
                                f"{templates} templates); the server's limit is {self.max_prompts} (--max-prompts): "
                                f"send fewer labels or templates")

    def check_patch_scores(self, classes: int, patches: int) -> None:
        if classes * patches > self.max_patch_scores:
            raise LimitExceeded(f"this segmentation would score {classes} classes x {patches} patches, more than the "
                                f"server's limit of {self.max_patch_scores}")


class LimitExceeded(ClipPaclError):
    """A request costs more than a stated limit allows (answered 413, naming the limit)."""


class Busy(ClipPaclError):
    """The server is at capacity for now (answered 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DecodeBudget:
    """Bytes of decoded pixels in flight, shared by every request: `reserve(n)` waits for n bytes to be free."""

    def __init__(self, total_bytes: int, wait_s: float, retry_after_s: int):
        self.total = total_bytes
        self.wait_s = wait_s
        self.retry_after_s = retry_after_s
        self._free = total_bytes
        self._cond = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._cond:
            return self.total - self._free

    @contextmanager
    def reserve(self, nbytes: int, name: str) -> Iterator[None]:
        if nbytes > self.total:
            raise LimitExceeded(f"{name} needs {nbytes / MB:.0f} MB to decode, more than the server's decode "
                                f"budget of {self.total / MB:.0f} MB (--decode-budget-mb)")
        with self._cond:
            if not self._cond.wait_for(lambda: self._free >= nbytes, timeout=self.wait_s):
                raise Busy(f"the server is decoding other images; try again in {self.retry_after_s} s",
                           self.retry_after_s)
            self._free -= nbytes
        try:
            yield
        finally:
            with self._cond:
                self._free += nbytes
                idle = self._free == self.total
                self._cond.notify_all()
            if idle and nbytes >= TRIM_AFTER_BYTES:
                release_free_memory()


class InferenceQueue:
    """One model call at a time, first come first served, for at most `depth` admitted requests.

    `admitted()` spans a whole request (503 when `depth` are in already); `turn()` is one model call inside it.
    A request with many prompts takes many turns and goes to the back of the line after each, so every
    request admitted before a small one delays it by one turn at most.
    """

    def __init__(self, depth: int, retry_after_s: int):
        self.depth = depth
        self.retry_after_s = retry_after_s
        self._admitted = 0
        self._line: deque[object] = deque()
        self._running = False
        self._cond = threading.Condition()

    @property
    def admitted_now(self) -> int:
        with self._cond:
            return self._admitted

    @contextmanager
    def admitted(self) -> Iterator[None]:
        with self._cond:
            if self._admitted >= self.depth:
                raise Busy(f"the server is busy ({self._admitted} requests in progress, at most {self.depth}); "
                           f"try again in {self.retry_after_s} s", self.retry_after_s)
            self._admitted += 1
        try:
            yield
        finally:
            with self._cond:
                self._admitted -= 1

    @contextmanager
    def turn(self) -> Iterator[None]:
        ticket = object()
        with self._cond:
            self._line.append(ticket)
            self._cond.wait_for(lambda: not self._running and self._line[0] is ticket)
            self._line.popleft()
            self._running = True
        try:
            yield
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()


# Decoded images at least this large are returned to the system when the budget falls idle (glibc keeps freed
# heap memory otherwise: the issue measured 1.5-3.45 GB still held after a burst of large uploads).
TRIM_AFTER_BYTES = 32 * MB
_LIBC = None


def release_free_memory() -> bool:
    """glibc's malloc_trim(0): give the heap's free pages back to the system; False where there is no glibc."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    return bool(_LIBC) and bool(_LIBC.malloc_trim(0))
