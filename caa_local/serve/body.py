"""Request bodies are read here, bounded in size and in time (a plain ASGI middleware).

The whole body of a POST is read before any route sees it: counted as it arrives and refused
with 413 past the limit, whatever Content-Length claimed, and refused with 408 (the connection
then closed) when it has not all arrived within the deadline, so a client that trickles a body
in holds a connection for seconds, not forever. Responses get the matching bound on the other
side: a write that waits longer than the write deadline for a client that does not read ends
the response (the slot was handed back when the generation ended; see slots.py).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import error_body
from caa_local.serve.guard import Message, Receive, Scope, Send, send_error

CLOSE = [(b"connection", b"close")]
T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """``await awaitable``, or TimeoutError after ``seconds`` (no extra task on 3.11+: this runs per write)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class BodyTooLarge(Exception):
    pass


class BodyGuard:
    def __init__(self, app: Callable[..., Awaitable[None]], config: ServeConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = self._bounded_send(send)
        limit = self.config.max_body_bytes
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and len(declared) < 20 and int(declared) > limit:
            await send_error(send, 413, _too_large(int(declared), limit), CLOSE)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        try:
            body = await within(_read(receive, limit), self.config.body_timeout)
        except asyncio.TimeoutError:
            await send_error(send, 408, error_body(
                f"request body not received within {self.config.body_timeout:g} s", "timeout", None,
                "body_timeout"), CLOSE)
            return
        except BodyTooLarge:
            await send_error(send, 413, _too_large(limit + 1, limit, at_least=True), CLOSE)
            return
        if body is None:  # the client left
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _bounded_send(self, send: Send) -> Send:
        timeout = self.config.write_timeout

        async def bounded(message: Message) -> None:
            try:
                await within(send(message), timeout)
            except asyncio.TimeoutError:
                # The client stopped reading: end this response (uvicorn then drops the connection).
                raise ConnectionAbortedError(f"client did not read for {timeout:g} s") from None

        return bounded


async def _read(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> dict[str, Any]:
    got = f"more than {limit}" if at_least else str(size)
    return error_body(f"request body too large: {got} bytes, the limit is {limit} bytes", "too_large", None,
                      "body_too_large")
