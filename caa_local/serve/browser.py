"""What a web browser may do with the server (a plain ASGI middleware, outermost).

Any page the user visits can send requests to a server on localhost; a key is not the default
there, so the browser's own signals decide:

- a request carrying an ``Origin`` header that is neither the server's own origin (the page at
  /) nor one named by ``--allow-origin`` gets 403, so no other site's script or form can make
  the server work (browsers send Origin on every cross-site POST and fetch);
- POST, PUT and PATCH bodies must be ``application/json`` (415 otherwise): the content types a
  page may send cross-site without asking first (text/plain, forms) never reach a route;
- an allowed origin gets CORS headers on every answer, and its preflight (OPTIONS) is answered
  here with the methods and headers the API takes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import clip, error_body
from caa_local.serve.guard import Message, Receive, Scope, Send, send_error

ALLOW_METHODS = b"GET, POST, OPTIONS"
ALLOW_HEADERS = b"Authorization, Content-Type, X-Api-Key"
BODY_METHODS = ("POST", "PUT", "PATCH")


def normalize_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def is_json(content_type: bytes) -> bool:
    """application/json, with or without parameters (charset=utf-8)."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == b"application/json"


class BrowserGuard:
    def __init__(self, app: Callable[..., Awaitable[None]], config: ServeConfig) -> None:
        self.app = app
        self.allowed = frozenset(normalize_origin(o) for o in config.allow_origins)

    def _allowed(self, origin: str) -> bool:
        return normalize_origin(origin) in self.allowed or "*" in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        method = scope.get("method", "")
        raw_origin = headers.get(b"origin")
        cors: list[tuple[bytes, bytes]] = []
        if raw_origin is not None:
            origin = raw_origin.decode("latin-1")
            own = f"{scope.get('scheme', 'http')}://{headers.get(b'host', b'').decode('latin-1').strip().lower()}"
            if normalize_origin(origin) == own:
                raw_origin = None  # the server's own page: no CORS needed
            elif not self._allowed(origin):
                await send_error(send, 403, error_body(
                    f"Origin {clip(origin)!r} may not use this server (only its own page may); start it with "
                    "--allow-origin ORIGIN to let another site's pages call it", "permission", None, "bad_origin"))
                return
            else:
                cors = [(b"access-control-allow-origin", raw_origin), (b"vary", b"Origin")]
            if cors and method == "OPTIONS" and b"access-control-request-method" in headers:
                await send({"type": "http.response.start", "status": 204, "headers": [
                    *cors, (b"access-control-allow-methods", ALLOW_METHODS),
                    (b"access-control-allow-headers", ALLOW_HEADERS), (b"access-control-max-age", b"600")]})
                await send({"type": "http.response.body", "body": b""})
                return
        if method in BODY_METHODS and not is_json(headers.get(b"content-type", b"")):
            shown = headers.get(b"content-type", b"").decode("latin-1") or "none"
            await send_error(send, 415, error_body(
                f"Content-Type {clip(shown)!r}: send the body as JSON with 'Content-Type: application/json'",
                "unsupported_media_type", None, "unsupported_media_type"), cors)
            return
        if not cors:
            await self.app(scope, receive, send)
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        await self.app(scope, receive, with_cors)
