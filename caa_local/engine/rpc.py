"""llama.cpp's RPC workers: the endpoints a model offloads to (``--rpc``) and a worker of our own.

llama.cpp's RPC client aborts the whole process when it cannot reach a worker, so every
endpoint is checked here first with the protocol's own HELLO (a plain TCP connect would pass a
port that something else listens on): unreachable, busy, foreign and other-version workers each
get one clear error before llama.cpp sees them.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from caa_local.core.errors import CaaError
from caa_local.engine import _native

DEFAULT_PORT = 50052  # llama.cpp's rpc-server default
_HELLO = 14  # RPC_CMD_HELLO, fixed across protocol versions (ggml-rpc.cpp)
_CAPS = 24  # RPC_CONN_CAPS_SIZE: the HELLO request's body
_HELLO_REPLY = struct.Struct("<BBBB24s")  # major, minor, patch, padding, capabilities


class RpcError(CaaError):
    """An RPC worker that cannot be used (unreachable, busy, another protocol)."""


def require_rpc() -> None:
    if not _native.rpc_available():
        raise RpcError(
            "this llama-cpp-python was built without llama.cpp's RPC backend; reinstall it with "
            "CMAKE_ARGS=\"-DGGML_RPC=ON\" pip install --force-reinstall --no-cache-dir llama-cpp-python==0.3.36"
        )


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """('host', port) of 'host:port' or '[v6]:port'; the port is required."""
    host, sep, port = endpoint.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RpcError(f"--rpc {endpoint!r}: expected HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    return host, int(port)


def parse_endpoints(specs: Sequence[str]) -> list[str]:
    """--rpc values ('host:port[,host:port...]', repeatable) as a list without repeats."""
    out: list[str] = []
    for spec in specs:
        for endpoint in filter(None, (e.strip() for e in spec.split(","))):
            split_endpoint(endpoint)
            if endpoint not in out:
                out.append(endpoint)
    return out


def check_worker(endpoint: str, timeout: float = 10.0) -> tuple[int, int, int]:
    """The protocol version (major, minor, patch) of the worker at ``endpoint``, after a HELLO."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(bytes([_HELLO]) + struct.pack("<Q", _CAPS) + bytes(_CAPS))
            head = _recv(sock, 8, endpoint)
            size = struct.unpack("<Q", head)[0]
            if size != _HELLO_REPLY.size:
                raise RpcError(f"RPC worker {endpoint}: not a llama.cpp RPC worker (answered the "
                               f"handshake with {size} bytes)")
            major, minor, patch, _, _ = _HELLO_REPLY.unpack(_recv(sock, size, endpoint))
    except socket.timeout:
        raise RpcError(f"RPC worker {endpoint}: no handshake within {timeout:g} s (is it serving "
                       "another client? a worker serves one at a time)") from None
    except ConnectionResetError:
        raise RpcError(f"RPC worker {endpoint}: reset the connection during the handshake (not a "
                       "llama.cpp RPC worker, or another protocol version)") from None
    except ConnectionRefusedError:
        raise RpcError(f"RPC worker {endpoint}: connection refused (start `caa-local rpc-worker "
                       f"--port {port}` or llama.cpp's rpc-server there)") from None
    except OSError as err:
        raise RpcError(f"RPC worker {endpoint}: {err.strerror or err}") from None
    if major != _native.RPC_PROTO_MAJOR or minor > _native.RPC_PROTO_MINOR:
        raise RpcError(f"RPC worker {endpoint}: speaks RPC protocol {major}.{minor}.{patch}, this "
                       f"llama.cpp {_native.RPC_PROTO_MAJOR}.{_native.RPC_PROTO_MINOR} (run the same "
                       "llama.cpp version on both sides)")
    return major, minor, patch


def wait_for_worker(worker: subprocess.Popen[Any], endpoint: str, timeout: float = 60.0) -> None:
    """Wait until the just-started ``caa-local rpc-worker`` process ``worker`` answers at
    ``endpoint``; RpcError if it exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_worker(endpoint, timeout=2)
            return
        except RpcError as err:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RpcError(f"the RPC worker at {endpoint} did not start: {err}") from None
            time.sleep(0.1)


def _recv(sock: socket.socket, n: int, endpoint: str) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RpcError(f"RPC worker {endpoint}: closed the connection during the "
                           "handshake (not a llama.cpp RPC worker, or another protocol version)")
        data += chunk
    return data


_on_lost: tuple[int, Callable[[str], None] | None] = (1, None)


def on_worker_lost(exit_code: int = 1, hook: Callable[[str], None] | None = None) -> None:
    """What happens when a worker goes away mid-decode, which llama.cpp cannot survive: one
    ``Error:`` line, then ``hook(message)`` from the aborting thread, which never returns (the
    hook must end the process, e.g. after answering open requests), or with no hook an exit
    with ``exit_code``. Applies to models connected from now on."""
    global _on_lost
    _on_lost = (exit_code, hook)


def connect(endpoints: Sequence[str]) -> list[str]:
    """Checked endpoints for ``Model(rpc=...)``; from here on, losing a worker is handled as
    ``on_worker_lost`` says (by default: one Error: line and exit status 1)."""
    require_rpc()
    for endpoint in endpoints:
        check_worker(endpoint)
    if endpoints:
        _native.rpc_on_lost(*_on_lost)
    return list(endpoints)


def serve(host: str, port: int, n_threads: int = 0, cache_dir: str = "") -> None:
    """Serve this machine's devices to llama.cpp RPC clients until the process ends."""
    require_rpc()
    try:
        _native.rpc_serve(f"{host}:{port}", cache_dir, n_threads)
    except RuntimeError as err:
        raise RpcError(str(err)) from None
