"""`caa-local serve`: the OpenAI-compatible server with per-request steering, and its page."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import click

from caa_local.cli import (any_arch_option, chat_template_option, load_vector_specs, model_options, open_engine,
                           rpc_endpoints, warn, warn_multipliers)
from caa_local.core.errors import CaaError
from caa_local.core.positions import POSITIONS
from caa_local.serve.config import LOOPBACK, host_name



@click.command()
@model_options
@chat_template_option
@click.option("host", "--host", default="127.0.0.1", show_default=True,
              help="Address to bind (anything but loopback should come with --api-key).")
@click.option("port", "--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("slots", "--slots", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Requests answered at once: one llama.cpp context each, sharing one loaded model.")
@click.option("parallel", "--parallel", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Answer up to N requests as N sequences of one llama.cpp context, every one's next token "
                   "in one decode, each steered its own way (continuous batching; replaces --slots).")
@click.option("vectors_dirs", "--vectors-dir", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Directory of vector files requests may name (the shipped vectors always are); repeatable.")
@click.option("vectors", "--vector", "-v", multiple=True, metavar="NAME|FILE[:SCALE]",
              help="Default steering, used when a request says nothing about steering; repeatable.")
@click.option("layers", "--layers", default=None, metavar="SPEC",
              help="Layers for the --vector defaults, e.g. 12, 10-14, all (default: recommended layer).")
@click.option("positions", "--positions", type=click.Choice(POSITIONS), default="response", show_default=True,
              help="Default steering positions: only the answer (CAA's mask) or every token.")
@click.option("api_key", "--api-key", envvar="CAA_LOCAL_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health and the page "
                   "(or set CAA_LOCAL_API_KEY).")
@click.option("max_body", "--max-body", type=click.IntRange(min=1024), default=1 << 20, show_default=True,
              help="Largest request body in bytes.")
@click.option("max_queue", "--max-queue", type=click.IntRange(min=0), default=256, show_default=True,
              help="Requests that may wait for a slot; more get 503 (0: no waiting line, 503 when every slot is busy).")
@click.option("allow_origins", "--allow-origin", multiple=True, metavar="ORIGIN",
              help="Another web origin whose pages may call the API (e.g. http://localhost:3000; '*': any), "
                   "with CORS headers; repeatable. Other origins get 403.")
@click.option("allow_hosts", "--allow-host", multiple=True, metavar="NAME",
              help="A Host name served without --api-key besides loopback and the bind address "
                   "(DNS-rebinding guard; '*': any); repeatable.")
@click.option("max_connections", "--max-connections", type=click.IntRange(min=1), default=64, show_default=True,
              help="Open connections at once; more get 503.")
@click.option("body_timeout", "--body-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds for a request body to arrive (408 after); also how long a response may wait "
                   "for a client that does not read.")
@click.option("preset_flags", "--preset", multiple=True, metavar="NAME=VECTOR[:SCALE][@LAYERS][,...]",
              help="A steering clients choose by model name (e.g. cheerful=sentiment:1.5@23); repeatable.")
@click.option("presets_file", "--presets", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Presets file (.toml or .json); presets saved from the page are written there when writable.")
@click.option("ollama_port", "--ollama-port", type=click.IntRange(1, 65535), default=None,
              help="Also listen on this port (e.g. 11434, Ollama's) for clients that assume it.")
@click.option("open_browser", "--open", is_flag=True, help="Open the steering page in the default browser.")
@any_arch_option
def serve(model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int, chat_template: str | None,
          host: str, port: int, slots: int, parallel: int, vectors_dirs: tuple[Path, ...], vectors: tuple[str, ...], layers: str | None,
          positions: str, api_key: str | None, max_body: int, max_queue: int, allow_origins: tuple[str, ...],
          allow_hosts: tuple[str, ...], max_connections: int, body_timeout: float, preset_flags: tuple[str, ...],
          presets_file: Path | None, ollama_port: int | None, open_browser: bool, any_arch: bool) -> None:
    """Serve the model over an OpenAI-compatible API, steered per request, with a page at /.

    Requests may add "steering": [{"vector": "sentiment", "scale": -2, "layers": "23"}], or choose a
    preset by model name ("model": "sentiment-neg"; GET /v1/models lists them). Ollama's API
    (/api/chat, /api/generate, /api/tags, ...) is served on the same port.

    \b
    Example:
      caa-local serve --parallel 8 --vector sentiment:2 --open
      curl localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"messages": [{"role": "user", "content": "Hi"}], "steering": [{"vector": "sentiment", "scale": -2}]}'
    """
    missing = [m for m in ("fastapi", "uvicorn", "pydantic") if importlib.util.find_spec(m) is None]
    if missing:
        raise CaaError(f"caa-local serve needs {', '.join(missing)}: pip install 'caa-local[serve]'")
    if api_key is not None and not api_key.strip():
        raise CaaError("--api-key: expected a non-empty key")
    from caa_local.core.layers import parse_layer_spec
    from caa_local.serve.presets import parse_preset_flag, read_presets_file

    for flag in preset_flags:  # syntax errors before the model loads
        parse_preset_flag(flag)
    if presets_file is not None:
        read_presets_file(presets_file)
    if ollama_port is not None and ollama_port == port:
        raise CaaError(f"--ollama-port {ollama_port}: the same as --port (the Ollama API is on --port too)")

    loaded = load_vector_specs(vectors)
    if layers:
        parse_layer_spec(layers)  # syntax errors before the model loads
    warn_multipliers(scale for _, _, scale in loaded)
    origins = tuple(check_origin(o) for o in allow_origins)
    if host not in LOOPBACK and not api_key:
        warn(f"Warning: serving on {host} with no --api-key: anyone who reaches this address can use the model")
    if parallel and slots > 1:
        raise CaaError("--parallel and --slots are two ways to answer requests at once: use one")
    if n_threads == 0 and slots > 1:  # slots decode at once: share the cores rather than oversubscribe
        n_threads = max(1, (os.cpu_count() or 1) // slots)
    guard = None
    if rpc := rpc_endpoints():
        from caa_local.serve.supervise import RpcLossGuard, is_child, supervise

        if not is_child():  # the model lives in a child this process restarts when a worker is lost
            sys.exit(supervise(rpc, host, port, sys.argv[1:], warn))
        guard = RpcLossGuard()
    engine = open_engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template)

    from caa_local.serve.config import ServeConfig
    from caa_local.serve.planning import Defaults
    from caa_local.serve.server import build, default_terms, run

    layer_list = parse_layer_spec(layers, engine.n_layer) if layers else None
    defaults = Defaults(default_terms(engine, loaded, layer_list, any_arch=any_arch), positions)
    config = ServeConfig(host=host, port=port, slots=slots, parallel=parallel, api_key=api_key, vectors_dirs=vectors_dirs,
                         positions=positions, max_body_bytes=max_body, max_queue=max_queue,
                         allow_origins=origins, allow_hosts=tuple(host_name(h) for h in allow_hosts),
                         max_connections=max_connections, body_timeout=body_timeout,
                         write_timeout=body_timeout,
                         presets=preset_flags, presets_file=presets_file, ollama_port=ollama_port)
    app, pool, library = build(config, engine, defaults)
    if guard is not None:
        app = guard.wrap(app)
    for line in library.skipped:
        warn(f"Warning: vector skipped: {line}")
    run(config, app, pool, warn, open_browser)


def check_origin(origin: str) -> str:
    """An --allow-origin value: '*' or scheme://host[:port], as browsers send it."""
    text = origin.strip().rstrip("/")
    if text == "*" or re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+", text):  # also app:// and the like
        return text
    raise CaaError(f"--allow-origin {origin!r}: expected scheme://host[:port] (e.g. http://localhost:3000) or '*'")
