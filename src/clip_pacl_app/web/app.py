"""The FastAPI app of `clip-pacl serve`: JSON endpoints over a WebService, and one static page.

Endpoints are plain (sync) functions, so Starlette runs each in its threadpool and the event loop stays
free while the model works. Every error is JSON `{"error": "one sentence"}`: 400 for bad input
(not an image, no labels, bad k), 404 for what the server does not have (no index, no such image id),
413 for an upload or a request cost over a stated limit (`web/limits.py`: prompts, pixels, patches), 503 with
`Retry-After` when the server is at capacity, 403 for a request the browser was tricked into sending. Files are
served from two fixed places only: the page's own files by name from a fixed table, and thumbnails of indexed
images by their id.

A server on 127.0.0.1 is still reachable from any web page the user opens: through DNS rebinding (a
hostile name that resolves to 127.0.0.1, so the page reads our answers as same-origin) and through
cross-site form POSTs. `RequestGuard` closes both: on loopback only loopback Host names are answered, and
a POST must carry the `X-Requested-With: clip-pacl` header, which a cross-site page cannot add without a
CORS preflight that this server never grants (and an Origin, when sent, must be this server's own).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_pacl.errors import ClipPaclError
from clip_pacl.segmentation.predict import DEFAULT_TEMPLATES
from clip_pacl.zeroshot.templates import OPENAI_IMAGENET_TEMPLATES
from clip_pacl_app.web.limits import Busy, LimitExceeded
from clip_pacl_app.web.service import NotFound, WebService, parse_image_id, parse_labels, parse_templates

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_QUERY_CHARS = 1000  # the tokenizer keeps 77 tokens anyway; longer queries are mistakes or abuse
# The header the page sends with every POST (a "non-simple" header: cross-site, the browser must ask first).
REQUESTED_WITH = ("x-requested-with", "clip-pacl")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
STATIC_DIR = Path(__file__).parent / "static"
# The page's files, by the only names under which they are served.
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
# The page loads nothing from elsewhere; overlays arrive as data: URLs.
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status)


class UploadLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, before the app buffers them.

    A declared Content-Length over the cap is refused without reading the body; a body without one
    (chunked) is counted as it streams in and refused once it passes the cap.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = f"the upload is larger than the server's limit of {_megabytes(self.max_bytes)} MB"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error(413, too_large)(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(too_large)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge as exc:  # raised outside FastAPI's handlers (which answer it themselves)
            if started:
                raise
            await error(413, exc.detail)(scope, receive, send)


class RequestGuard:
    """ASGI middleware: 403 for requests a hostile web page could make the user's browser send (module docstring).

    `loopback_only`: the server listens on a loopback address, so every legitimate Host names loopback
    (any port: an SSH tunnel may forward another one). Bound to a public address, the Host check is off
    (the operator chose to be reachable under other names) but POSTs are still checked.
    """

    def __init__(self, app: ASGIApp, loopback_only: bool):
        self.app = app
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal:
                await error(403, refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> str | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        if self.loopback_only and _host_name(host) not in LOOPBACK_NAMES:
            return f"this server answers only to localhost, not to Host '{host[:60]}' (see clip-pacl serve --host)"
        if scope["method"] in ("GET", "HEAD"):
            return None
        if headers.get(REQUESTED_WITH[0]) != REQUESTED_WITH[1]:
            return f"POST requests need the header '{REQUESTED_WITH[0]}: {REQUESTED_WITH[1]}' (the page sends it)"
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            return f"cross-origin POST from '{origin[:60]}' refused"
        return None


def _host_name(host: str) -> str:
    """The name part of a Host header: 'localhost:8000' -> 'localhost', '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """Whether a listening address is loopback only (127.0.0.0/8, ::1 or the name localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _TooLarge(StarletteHTTPException):
    """An HTTP exception, so that FastAPI's body parsing passes it on instead of turning it into a 400."""

    def __init__(self, message: str):
        super().__init__(413, message)


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.3g}"


def create_app(service: WebService, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
               host: str = "127.0.0.1") -> FastAPI:
    """The web app over `service` (its model and index are loaded once, by the caller), to listen on `host`."""
    app = FastAPI(title="clip-pacl", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)
    app.add_middleware(RequestGuard, loopback_only=is_loopback(host))  # added last: runs first

    _add_error_handlers(app)

    @app.get("/api/health")
    def health() -> dict:
        return {**service.health(), "max_upload_mb": float(_megabytes(max_upload_bytes))}

    @app.get("/api/search")
    def search_by_text(q: Annotated[str, Query()], k: Annotated[int, Query()] = 12,
                       prefix: Annotated[str | None, Query()] = None) -> dict:
        with service.admitted():
            return {"query": _short_query(q), "prefix": prefix or None,
                    "results": service.search_text(q, k, prefix)}

    @app.post("/api/search")
    def search_by_image(image: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 12,
                        prefix: Annotated[str | None, Form()] = None) -> dict:
        service.require_index()  # no index: say so before decoding the upload
        with service.admitted():
            pixels = service.decode(image.file, image.filename or "upload", service.query_pixels)
            return {"query": None, "prefix": prefix or None, "results": service.search_image(pixels, k, prefix)}

    @app.post("/api/classify")
    def classify(image: Annotated[UploadFile, File()], labels: Annotated[str, Form()],
                 templates: Annotated[str | None, Form()] = None) -> dict:
        names = parse_labels(labels)
        prompts = parse_templates(templates, OPENAI_IMAGENET_TEMPLATES)
        service.limits.check_prompts(len(names), len(prompts))  # before any work
        with service.admitted():
            pixels = service.decode(image.file, image.filename or "upload", service.model_pixels)
            return {"labels": names, "num_templates": len(prompts),
                    "predictions": service.classify(pixels, names, prompts)}

    @app.post("/api/segment")
    def segment(image: Annotated[UploadFile, File()], labels: Annotated[str, Form()],
                templates: Annotated[str | None, Form()] = None, method: Annotated[str | None, Form()] = None,
                background_threshold: Annotated[float | None, Form()] = None) -> dict:
        names = parse_labels(labels)
        prompts = parse_templates(templates, DEFAULT_TEMPLATES)
        service.limits.check_prompts(len(names), len(prompts))  # before any work
        methods = service.segment_methods()
        if method and method not in methods:
            raise _bad_method(method, methods)
        with service.admitted():
            work = service.decode(image.file, image.filename or "upload", service.segment_input)
            return {"labels": names, **service.segment(work, names, prompts, method or None, background_threshold)}

    @app.get("/thumb/{image_id}")
    def thumbnail(image_id: str) -> Response:
        data = service.thumbnail(parse_image_id(image_id))
        return Response(data, media_type="image/jpeg",
                        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/")
    def page() -> Response:
        return _static("index.html")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        return _static(name)

    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON `{"error": "one sentence"}`, with the status the module docstring lists."""
    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(LimitExceeded)
    async def _too_costly(request: Request, exc: LimitExceeded) -> JSONResponse:
        return error(413, str(exc))

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        response = error(503, str(exc))
        response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(ClipPaclError)
    async def _bad_input(request: Request, exc: ClipPaclError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        field = str(first["loc"][-1]) if first.get("loc") else "request"
        if first.get("type") == "missing":
            return error(400, f"missing field '{field}'")
        return error(400, f"{field}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))


def _short_query(q: str) -> str:
    if len(q) > MAX_QUERY_CHARS:
        raise ClipPaclError(f"the search query is {len(q)} characters long; at most {MAX_QUERY_CHARS} are accepted")
    return q


def _bad_method(method: str, methods: list[str]) -> ClipPaclError:
    return ClipPaclError(f"segmentation method '{method[:40]}' is not available for this model "
                         f"(choose from {', '.join(methods) or 'none'})")


def _static(name: str) -> Response:
    if name not in STATIC_FILES:
        raise NotFound(f"no page file named '{name[:40]}'")
    return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC_FILES[name], headers=PAGE_HEADERS)
