"""The chat page of ``minicpm serve``: ``GET /`` and the static files under ``GET /web/…``.

Contract (``page_routes``, included by :func:`~minicpm.server.app.build_app` unless the server was
started with ``--no-web``):

* Everything the page loads comes from :data:`WEB_DIR` inside the package (the vendored npm
  libraries too, under ``web/vendor/``): no request leaves the machine. The Content-Security-Policy
  sent with every file says so to the browser as well (``'self'`` only, no inline script, no eval).
* The page and its files hold no secret: they are served without the API key; the API routes the
  page calls still require it (the page asks for the key on a 401 and keeps it in the browser).
* A file is served with an explicit content type from its suffix (``.mjs`` as JavaScript, which
  module workers need); an unknown suffix, a hidden file, a path leaving :data:`WEB_DIR` or a missing
  file is a 404 in the API's error envelope.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

__all__ = ["CONTENT_SECURITY_POLICY", "CONTENT_TYPES", "WEB_DIR", "page_routes"]

WEB_DIR = Path(__file__).with_name("web")
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "worker-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded package serves its new files at once
}

page_routes = APIRouter()


def _file(relative: str) -> FileResponse:
    root = WEB_DIR.resolve()
    path = (root / relative).resolve()
    content_type = CONTENT_TYPES.get(path.suffix)
    hidden = any(part.startswith(".") for part in Path(relative).parts)
    if content_type is None or hidden or not path.is_relative_to(root) or not path.is_file():
        raise StarletteHTTPException(404)
    return FileResponse(path, media_type=content_type, headers=HEADERS)


@page_routes.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return _file("index.html")


@page_routes.get("/web/{relative:path}", include_in_schema=False)
async def web_file(relative: str) -> FileResponse:
    return _file(relative)
