"""The guard in front of every route: Host check and API key (a plain ASGI middleware).

Order as in llama.cpp's server: DNS-rebinding Host check (whenever there is no key), then the
key (``Authorization: Bearer KEY`` or ``X-Api-Key``, compared in constant time) for all but the
public set (/health and the page's static files). The layers around it: browser.py (Origin,
CORS, content type) outside, body.py (size and deadline of the body) inside.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Awaitable

from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import clip, error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
PUBLIC_PREFIX = "/static/"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX)


async def send_error(send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *extra]})
    await send({"type": "http.response.body", "body": data})


class Guard:
    def __init__(self, app: Callable[..., Awaitable[None]], config: ServeConfig) -> None:
        self.app = app
        self.config = config
        self.key = config.api_key.encode() if config.api_key else None

    def _key_ok(self, headers: dict[bytes, bytes]) -> bool:
        given = headers.get(b"x-api-key", b"")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given, self.key or b"")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.config.allowed_host(host):
            await send_error(send, 403, error_body(
                f"Host {clip(host)!r} is not a name of this server; start it with --allow-host NAME "
                "(or --api-key) to serve other names",
                "permission", None, "bad_host"))
            return
        if self.key is not None and not is_public(path) and scope.get("method") != "OPTIONS" \
                and not self._key_ok(headers):
            missing = b"authorization" not in headers and b"x-api-key" not in headers
            message = ("missing API key: send 'Authorization: Bearer KEY'" if missing
                       else "invalid API key")
            await send_error(send, 401, error_body(message, "authentication", None, "invalid_api_key"),
                             [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
