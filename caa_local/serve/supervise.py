"""`serve --rpc`: keep answering while an RPC worker is away.

llama.cpp's RPC client cannot survive a worker that goes away mid-decode, so the server that
holds the model runs in a child process and this one supervises it. The supervisor owns the
listening socket (the port never closes) and hands it to each child. When a worker is lost,
the child answers its open requests with 503 (or an error event where a stream has begun) and
exits with ``RPC_LOST``; the supervisor then answers every request with 503 and a Retry-After
until each worker completes llama.cpp's handshake again, and starts a fresh child on the same
socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from caa_local.engine.rpc import RpcError, check_worker, on_worker_lost

RPC_LOST = 75  # the child's exit status when a worker went away (EX_TEMPFAIL)
FD_ENV = "CAA_LOCAL_SERVE_FD"  # set in the child: the listening socket's file descriptor
RETRY_AFTER_S = 5
CHILD_GRACE_S = 3.0  # how long a child has to answer its open requests after losing a worker
HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT_S = 5.0


def is_child() -> bool:
    return FD_ENV in os.environ


def inherited_fd() -> int | None:
    value = os.environ.get(FD_ENV)
    return int(value) if value and value.isdigit() else None


def unavailable(path: str, message: str) -> bytes:
    """A complete 503 response in the API's own error shape (Ollama's under /api/)."""
    if path.startswith("/api/"):
        body: Any = {"error": message}
    else:
        body = {"error": {"message": message, "type": "server_error", "param": None,
                          "code": "rpc_worker_unavailable"}}
    data = json.dumps(body).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nRetry-After: {RETRY_AFTER_S}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


def _answer_503(conn: socket.socket, message: str) -> None:
    with conn:
        conn.settimeout(HEAD_TIMEOUT_S)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < HEAD_LIMIT:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            parts = head.split(b"\r\n", 1)[0].split()
            path = parts[1].decode("latin-1") if len(parts) >= 2 else "/"
            conn.sendall(unavailable(path, message))
        except OSError:
            pass


def wait_for_workers(listener: socket.socket, endpoints: Sequence[str], stop: threading.Event) -> bool:
    """Answer 503 on ``listener`` until every worker answers its handshake; False if stopped."""
    last_check = 0.0
    reason = "the model's RPC workers are not reachable yet"
    while not stop.is_set():
        if time.monotonic() - last_check >= 1.0:
            last_check = time.monotonic()
            try:
                for endpoint in endpoints:
                    check_worker(endpoint, timeout=2.0)
                return True
            except RpcError as err:
                reason = f"{err}; retrying"
        ready, _, _ = select.select([listener], [], [], 0.2)
        if ready:
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=_answer_503, args=(conn, reason), daemon=True).start()
    return False


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def supervise(endpoints: Sequence[str], host: str, port: int, argv: Sequence[str],
              say: Callable[[str], None]) -> int:
    """Run ``caa-local ARGV`` (a serve command) as a child on a socket this process keeps,
    restarting it whenever it exits for a lost worker. Returns the exit status to end with."""
    listener = listening_socket(host, port)
    stop = threading.Event()
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: Any) -> None:
        stop.set()
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    with listener:
        while wait_for_workers(listener, endpoints, stop):
            env = {**os.environ, FD_ENV: str(listener.fileno())}
            child = subprocess.Popen([sys.executable, "-m", "caa_local.cli", *argv], env=env,
                                     pass_fds=(listener.fileno(),))
            code = child.wait()
            if code != RPC_LOST or stop.is_set():
                return 0 if stop.is_set() and code in (0, -signal.SIGINT, 130) else code
            say("caa-local serve: an RPC worker went away; answering 503 until it is back")
    return 0


class RpcLossGuard:
    """ASGI middleware of the child: once a worker is lost, every open request ends with a
    503 (or, where its response has begun, an error event in the stream's own framing), then
    the process exits with RPC_LOST for the supervisor to take over."""

    def __init__(self) -> None:
        """Made before the model connects to its workers (``on_worker_lost`` applies from then)."""
        self.app: Any = None
        self.lost: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.message = ""
        on_worker_lost(RPC_LOST, self._on_lost)

    def wrap(self, app: Any) -> RpcLossGuard:
        self.app = app
        return self

    def _on_lost(self, message: str) -> None:  # llama.cpp's aborting thread, never returns to it
        self.message = "an RPC worker of this model went away; the server restarts once it is back"
        if self.loop is not None and self.lost is not None:
            self.loop.call_soon_threadsafe(self.lost.set)
        threading.Timer(CHILD_GRACE_S, os._exit, (RPC_LOST,)).start()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.lost is None:
            self.loop, self.lost = asyncio.get_running_loop(), asyncio.Event()
        if self.lost.is_set():
            await self._refuse(scope, send, None)
            return
        started: dict[str, Any] = {}

        async def tracked_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
            await send(message)

        app_task = asyncio.ensure_future(self.app(scope, receive, tracked_send))
        lost_task = asyncio.ensure_future(self.lost.wait())
        done, _ = await asyncio.wait({app_task, lost_task}, return_when=asyncio.FIRST_COMPLETED)
        if app_task in done:
            lost_task.cancel()
            app_task.result()
            return
        app_task.cancel()
        await self._refuse(scope, send, started or None)

    async def _refuse(self, scope: dict[str, Any], send: Any, started: dict[str, Any] | None) -> None:
        if started is None:
            raw = unavailable(scope.get("path", "/"), self.message)
            head, body = raw.split(b"\r\n\r\n", 1)
            headers = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(k.lower(), v) for k, v in headers]})
            await send({"type": "http.response.body", "body": body})
            return
        kind = dict(started.get("headers", [])).get(b"content-type", b"")
        if kind.startswith(b"text/event-stream"):
            error = {"error": {"message": self.message, "type": "server_error", "code": "rpc_worker_unavailable"}}
            tail = f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
        elif kind.startswith(b"application/x-ndjson"):
            tail = (json.dumps({"error": self.message}) + "\n").encode()
        else:
            tail = b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})
