"""The steering page: static files shipped in caa_local/web, served at / and /static/NAME.

Only the files listed in ASSETS are served (a fixed table, so no request maps to a path).
Each carries an ETag, so a reload costs a 304.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response

from caa_local.serve.errors import ApiError

ASSETS = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8", "chart.js": "text/javascript; charset=utf-8",
          "presets.js": "text/javascript; charset=utf-8"}


def load_assets() -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, content type, etag), read once."""
    root = resources.files("caa_local.web")
    out = {}
    for name, kind in ASSETS.items():
        data = root.joinpath(name).read_bytes()
        out[name] = (data, kind, '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
    return out


def mount(app: FastAPI) -> None:
    assets = load_assets()

    def serve(name: str, request: Request) -> Response:
        if name not in assets:
            raise ApiError(f"/static/{name}: no such file", "not_found")
        data, kind, etag = assets[name]
        headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(data, media_type=kind, headers=headers)

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        return serve("index.html", request)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request) -> Response:
        return serve(name, request)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return Response(status_code=204)
