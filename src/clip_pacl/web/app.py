"""The FastAPI app of `clip-pacl serve`: JSON endpoints over a WebService, and one static page.

Endpoints are plain (sync) functions, so Starlette runs each in its threadpool and the event loop stays
free while the model works. Every error is JSON `{"error": "one sentence"}`: 400 for bad input
(not an image, no labels, bad k), 404 for what the server does not have (no index, no such image id),
413 for an upload over the cap. Files are served from two fixed places only: the page's own files by
name from a fixed table, and thumbnails of indexed images by their id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_pacl.errors import ClipPaclError
from clip_pacl.segmentation.predict import DEFAULT_TEMPLATES
from clip_pacl.web.service import (
    NotFound,
    WebService,
    decode_upload,
    parse_image_id,
    parse_labels,
    parse_templates,
)
from clip_pacl.zeroshot.templates import OPENAI_IMAGENET_TEMPLATES

DEFAULT_MAX_UPLOAD_BYTES = 10 * 1024 * 1024
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


class _TooLarge(StarletteHTTPException):
    """An HTTP exception, so that FastAPI's body parsing passes it on instead of turning it into a 400."""

    def __init__(self, message: str):
        super().__init__(413, message)


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.3g}"


def create_app(service: WebService, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES) -> FastAPI:
    """The web app over `service` (its model and index are loaded once, by the caller)."""
    app = FastAPI(title="clip-pacl", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(UploadLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return error(404, str(exc))

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

    @app.get("/api/health")
    def health() -> dict:
        return {**service.health(), "max_upload_mb": float(_megabytes(max_upload_bytes))}

    @app.get("/api/search")
    def search_by_text(q: Annotated[str, Query()], k: Annotated[int, Query()] = 12) -> dict:
        return {"query": q, "results": service.search_text(q, k)}

    @app.post("/api/search")
    def search_by_image(image: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 12) -> dict:
        service.require_index()  # no index: say so before decoding the upload
        picture = decode_upload(image.file.read(), image.filename or "upload")
        return {"query": None, "results": service.search_image(picture, k)}

    @app.post("/api/classify")
    def classify(image: Annotated[UploadFile, File()], labels: Annotated[str, Form()],
                 templates: Annotated[str | None, Form()] = None) -> dict:
        names = parse_labels(labels)
        prompts = parse_templates(templates, OPENAI_IMAGENET_TEMPLATES)
        picture = decode_upload(image.file.read(), image.filename or "upload")
        return {"labels": names, "num_templates": len(prompts),
                "predictions": service.classify(picture, names, prompts)}

    @app.post("/api/segment")
    def segment(image: Annotated[UploadFile, File()], labels: Annotated[str, Form()],
                templates: Annotated[str | None, Form()] = None, method: Annotated[str | None, Form()] = None,
                background_threshold: Annotated[float | None, Form()] = None) -> dict:
        names = parse_labels(labels)
        prompts = parse_templates(templates, DEFAULT_TEMPLATES)
        methods = service.segment_methods()
        if method and method not in methods:
            raise _bad_method(method, methods)
        picture = decode_upload(image.file.read(), image.filename or "upload")
        return {"labels": names, **service.segment(picture, names, prompts, method or None, background_threshold)}

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


def _bad_method(method: str, methods: list[str]) -> ClipPaclError:
    return ClipPaclError(f"segmentation method '{method[:40]}' is not available for this model "
                         f"(choose from {', '.join(methods) or 'none'})")


def _static(name: str) -> Response:
    if name not in STATIC_FILES:
        raise NotFound(f"no page file named '{name[:40]}'")
    return Response((STATIC_DIR / name).read_bytes(), media_type=STATIC_FILES[name], headers=PAGE_HEADERS)
