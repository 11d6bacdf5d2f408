"""`caa-local rpc-worker`: llama.cpp's RPC server on this install, for a model split over machines."""

from __future__ import annotations

import threading
from pathlib import Path

import click

from caa_local.cli import warn

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@click.command(name="rpc-worker")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The RPC protocol has no authentication: only a trusted network.")
@click.option("--port", type=click.IntRange(1, 65535), default=50052, show_default=True, help="Port to listen on.")
@click.option("n_threads", "--threads", "-t", type=click.IntRange(min=0), default=0,
              help="CPU threads (0, the default: all cores).")
@click.option("cache_dir", "--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep large tensors sent by clients here, so a restarted client loads faster.")
def rpc_worker(host: str, port: int, n_threads: int, cache_dir: Path | None) -> None:
    """Serve this machine's devices (its GPUs, else its CPU) to llama.cpp RPC clients: another
    machine's `caa-local chat --rpc HOST:PORT` (or llama.cpp's own `--rpc`) then offloads
    layers here. Speaks llama.cpp's protocol, so llama.cpp's rpc-server and this worker are
    interchangeable when both come from the same llama.cpp version. One client at a time.

    \b
    Example:
      caa-local rpc-worker --host 0.0.0.0 --port 50052      # on the machine lending memory
      caa-local chat --model big.gguf --rpc 192.168.1.20:50052 --vector sentiment
    """
    from caa_local.engine.rpc import serve

    if host not in LOOPBACK:
        warn(f"WARNING: listening on {host}, not on loopback. Never expose an RPC worker to an open "
             "network: llama.cpp's RPC protocol has no authentication and is not secure.")
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    # The native server never returns while it listens; a daemon thread lets Ctrl-C end the process.
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve(host, port, n_threads, str(cache_dir or ""))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            failure.append(err)

    worker = threading.Thread(target=run, name="caa-rpc-worker", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
    if failure:
        raise failure[0]
