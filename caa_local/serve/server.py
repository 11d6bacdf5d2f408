"""Build the server from a loaded engine (slots, library, default steering) and run it with uvicorn."""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
import webbrowser
from collections.abc import Callable, Sequence
from typing import Any

from caa_local.core.errors import CaaError
from caa_local.core.steering import SteeringTerm, default_layers
from caa_local.core.vector import ControlVector
from caa_local.engine.engine import Engine
from caa_local.serve.config import ServeConfig
from caa_local.serve.library import VectorLibrary
from caa_local.serve.planning import Defaults
from caa_local.serve.batching import BatchPool
from caa_local.serve.slots import SlotPool
from caa_local.serve.supervise import inherited_fd


def default_terms(engine: Engine, loaded: Sequence[tuple[str, ControlVector, float]],
                  layers: Sequence[int] | None, any_arch: bool = False) -> tuple[SteeringTerm, ...]:
    """The --vector options as terms, checked against the model once."""
    return tuple(engine.make_term(name, vector, scale, list(layers) if layers else list(default_layers(vector)),
                                  any_arch=any_arch) for name, vector, scale in loaded)


def build(config: ServeConfig, engine: Engine, defaults: Defaults) -> tuple[Any, SlotPool, VectorLibrary]:
    """(app, pool, library): slot 0 is ``engine``'s own context, the others share its model."""
    from caa_local.serve import ollama
    from caa_local.serve.app import create_app
    from caa_local.serve.presets import PresetBook

    library = VectorLibrary.load(config.vectors_dirs, engine.n_embd, engine.n_layer, engine.architecture)
    book = PresetBook.build(engine, library, config, defaults, config.presets, config.presets_file)
    if config.parallel:
        pool: SlotPool | BatchPool = BatchPool(engine, config.parallel, max_queue=config.max_queue)
    else:
        engines = [engine, *(engine.new_context() for _ in range(config.slots - 1))]
        pool = SlotPool(engines, max_queue=config.max_queue)
    app = create_app(config, engine, pool, library, defaults, book)
    ollama.mount(app, config, engine, pool, book)
    return app, pool, library


def url_of(config: ServeConfig, port: int) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    host = "127.0.0.1" if host in ("0.0.0.0", "[::]") else host
    return f"http://{host}:{port}/"


def run(config: ServeConfig, app: Any, pool: SlotPool, say: Callable[[str], None],
        open_browser: bool = False) -> None:
    """Serve until Ctrl-C; say() the address once the socket listens."""
    import uvicorn

    from caa_local.serve.connection import head_deadline_protocol

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, fd=inherited_fd(),
                                           log_level="warning", access_log=False, timeout_graceful_shutdown=2,
                                           # h11 caps a request's line and headers (16 KiB; uvicorn's
                                           # httptools protocol buffers them without a bound), and
                                           # connection.py gives them a deadline.
                                           http=head_deadline_protocol(config.body_timeout),
                                           h11_max_incomplete_event_size=16 * 1024,
                                           limit_concurrency=config.max_connections,
                                           timeout_keep_alive=config.keep_alive))

    def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1] if server.servers else config.port
        url = url_of(config, port)
        say(f"caa-local serve: {url} (OpenAI API at {url}v1, Ollama API at {url}api, {len(pool.slots)} slot(s); "
            "Ctrl-C stops)")
        if config.ollama_port is not None:
            say(f"caa-local serve: Ollama's clients can also use {url_of(config, config.ollama_port)}")
        if open_browser:
            webbrowser.open(url)

    # --ollama-port: the same app on a second socket, so clients that assume Ollama's port find it.
    try:
        sockets = [listen(config.host, config.port), listen(config.host, config.ollama_port)] \
            if config.ollama_port is not None else None
        threading.Thread(target=announce, daemon=True).start()
        server.run(sockets=sockets)
    finally:
        pool.close()


def listen(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as err:
        raise CaaError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
