"""The guard in front of every route: Host check, API key, body size (a plain ASGI middleware).

Order as in llama.cpp's server: DNS-rebinding Host check (only without a key on a loopback
bind), then the key (``Authorization: Bearer KEY`` or ``X-Api-Key``, compared in constant time)
for all but the public set (/health and the page's static files), then the body, counted as it
arrives and refused with 413 past the limit, whatever Content-Length claimed.
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Callable, Awaitable

from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import error_body

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
                f"Host {host!r} is not a loopback name; start the server with --api-key to serve other hosts",
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
        limit = self.config.max_body_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await send_error(send, 413, _too_large(int(declared), limit))
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > limit:
                    await send_error(send, 413, _too_large(len(body), limit, at_least=True))
                    return
                if not message.get("more_body", False):
                    break
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


def _too_large(size: int, limit: int, at_least: bool = False) -> dict[str, Any]:
    got = f"more than {limit}" if at_least else str(size)
    return error_body(f"request body too large: {got} bytes, the limit is {limit} bytes", "too_large", None,
                      "body_too_large")
