"""The web app of `clip-pacl serve`: text/image search over an index, zero-shot classification, segmentation.

`WebService` holds the model and index and answers requests (no web dependency); `create_app(service)`
wraps it in a FastAPI app (needs `pip install 'clip-pacl[web]'`).
"""

from __future__ import annotations

from typing import Any

from clip_pacl.errors import MissingDependencyError

__all__ = ["WebService", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "WebService":  # loaded on use: `clip_pacl_app.web.limits` (the CLI's defaults) needs no torch
        from clip_pacl_app.web.service import WebService

        return WebService
    if name == "create_app":
        try:
            from clip_pacl_app.web.app import create_app
        except ImportError:
            raise MissingDependencyError("fastapi", "web", "the web app") from None
        return create_app
    raise AttributeError(f"module 'clip_pacl_app.web' has no attribute '{name}'")
