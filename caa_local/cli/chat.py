"""`caa-local chat` (a REPL with live steering) and `caa-local generate` (one answer).

The commands are thin: options, one library call (caa_local.chat.repl), echo. This module stays
cheap to import, so `caa-local chat --help` never loads the engine; the terminal loop with
prompt_toolkit line editing and history lives here too.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from caa_local.cli import (any_arch_option, chat_template_option, clamp_max_tokens, load_vector_specs, model_options,
                           open_engine, warn, warn_multipliers)
from caa_local.core.positions import POSITIONS



def steering_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--vector/--multiplier/--layers/--positions/--any-arch, shared by chat and generate."""
    options = [
        click.option("vectors", "--vector", "-v", multiple=True, metavar="NAME|FILE[:SCALE]",
                     help="Steer with a shipped vector or a .gguf file, optionally scaled; repeatable."),
        click.option("multiplier", "--multiplier", type=float, default=None,
                     help="Scale for vectors given without :SCALE (default: the vector's recommended one, else 1)."),
        click.option("layers", "--layers", default=None, metavar="SPEC",
                     help="Layers for every vector, e.g. 12, 10-14, all (default: the vector's recommended layer)."),
        click.option("positions", "--positions", type=click.Choice(POSITIONS), default="response",
                     show_default=True, help="Steer only the answer (CAA's mask) or every token."),
        click.option("when", "--when", multiple=True, metavar="[!]CONDITION[:THRESHOLD]",
                     help="Apply the --vector terms only when this condition (a shipped name or a condition "
                          ".gguf) fires on the user's message; repeat for OR, '!' for unless."),
        any_arch_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def sampling_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--system/--temperature/--top-p/--max-tokens/--seed (defaults: engine.CHAT_SAMPLING)."""
    options = [
        click.option("system", "--system", default=None, help="System message."),
        click.option("temperature", "--temperature", type=click.FloatRange(min=0), default=0.7,
                     show_default=True, help="Sampling temperature (0: greedy)."),
        click.option("top_p", "--top-p", type=click.FloatRange(0, 1, min_open=True), default=0.95,
                     show_default=True, help="Nucleus sampling threshold."),
        click.option("max_tokens", "--max-tokens", type=click.IntRange(min=1), default=256,
                     show_default=True, help="Most tokens per answer."),
        click.option("seed", "--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True,
                     help="Sampling seed."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def steer_all(engine: Any, loaded: Sequence[tuple[str, Any, float]], layers: str | None = None,
              any_arch: bool = False) -> None:
    """Steer with every loaded vector (on ``layers`` if given)."""
    from caa_local.core.layers import parse_layer_spec
    from caa_local.core.vector import no_layer_warning

    layer_list = parse_layer_spec(layers, engine.n_layer) if layers else None
    for name, vector, scale in loaded:
        engine.steer(name, vector, scale, layer_list, any_arch=any_arch)
        if layer_list is None and (warning := no_layer_warning(name, vector, scale)):
            warn(warning)


def _setup(model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int, vectors: tuple[str, ...],
           multiplier: float | None, layers: str | None, positions: str, any_arch: bool,
           temperature: float, top_p: float, max_tokens: int, seed: int, chat_template: str | None,
           when: tuple[str, ...] = ()):  # noqa: ANN202
    """(engine, sampling) with the --vector options applied; warnings go to stderr."""
    import dataclasses

    from caa_local.engine.engine import CHAT_SAMPLING
    from caa_local.core.layers import parse_layer_spec

    loaded = load_vector_specs(vectors, multiplier)
    if layers:
        parse_layer_spec(layers)  # syntax errors before the model loads
    if when:
        from caa_local.chat.conditions import parse_when
        from caa_local.core.errors import CaaError
        from caa_local.core.locate import resolve_vector

        if not loaded:
            raise CaaError("--when gates the --vector terms: give at least one --vector")
        for spec in when:
            resolve_vector(parse_when(spec)[0])  # unknown names before the model loads
    warn_multipliers(scale for _, _, scale in loaded)
    engine = open_engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template)
    steer_all(engine, loaded, layers, any_arch)
    if when:
        from caa_local.chat.conditions import gate, load_condition

        gate(engine, [t.name for t in engine.steering.terms], [load_condition(engine, w, any_arch) for w in when])
    sampling = dataclasses.replace(CHAT_SAMPLING, temperature=temperature, top_p=top_p,
                                   max_tokens=clamp_max_tokens(max_tokens, engine), seed=seed)
    return engine, sampling


def history_path() -> Path:
    env = os.environ.get("CAA_LOCAL_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "caa-local") / "chat_history"


def _line_reader() -> Callable[[str], str]:
    """prompt_toolkit's prompt on a terminal (line editing, history); input() on a pipe."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        def echoing_input(prompt: str) -> str:  # show what a pipe sent, so output reads as a chat
            click.echo(prompt, nl=False)
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            click.echo(line.rstrip("\n"))
            return line

        return echoing_input
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory

    history: Any = InMemoryHistory()
    try:
        path = history_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        history = FileHistory(str(path))
    except OSError:
        pass
    return PromptSession(history=history).prompt


def _preload_prompt_toolkit() -> threading.Thread:
    """Import prompt_toolkit while the model loads (the load releases the GIL)."""
    def work() -> None:
        if sys.stdin.isatty() and sys.stdout.isatty():
            import prompt_toolkit.shortcuts  # noqa: F401

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def repl(session: Any) -> None:
    """Read lines until /quit or Ctrl-D; Ctrl-C clears the line or stops an answer."""
    from caa_local.chat.repl import PROMPT, help_text

    session.say(help_text())
    read = _line_reader()
    while not session.finished:
        session.say(session.status())
        try:
            line = read(PROMPT)
        except KeyboardInterrupt:
            continue
        except EOFError:
            session.say()
            break
        try:
            session.handle(line)
        except KeyboardInterrupt:
            session.say("[interrupted]")


@click.command()
@model_options
@chat_template_option
@steering_options
@sampling_options
def chat(model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int, chat_template: str | None,
         vectors: tuple[str, ...], multiplier: float | None, layers: str | None, positions: str,
         when: tuple[str, ...], any_arch: bool, system: str | None, temperature: float, top_p: float,
         max_tokens: int, seed: int) -> None:
    """Chat with a model, changing its steering live with /steer, /scale, /unsteer.

    \b
    Example:
      caa-local chat --vector sentiment:4 --layers 12
      caa-local chat --vector sentiment --when '!work'
    """
    preload = _preload_prompt_toolkit()
    engine, sampling = _setup(model_path, n_ctx, n_threads, n_gpu_layers, vectors, multiplier, layers,
                              positions, any_arch, temperature, top_p, max_tokens, seed, chat_template, when)
    from caa_local.chat.repl import ChatSession

    preload.join()
    repl(ChatSession(engine, sampling, system=system, any_arch=any_arch, positions=positions))


@click.command()
@click.argument("prompt")
@model_options
@chat_template_option
@steering_options
@sampling_options
@click.option("json_path", "--json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the answer, steering and timings as JSON to this file.")
@click.option("force", "--force", is_flag=True, help="Overwrite the --json file if it exists.")
def generate(prompt: str, model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int,
             chat_template: str | None, vectors: tuple[str, ...], multiplier: float | None, layers: str | None,
             positions: str, when: tuple[str, ...], any_arch: bool, system: str | None, temperature: float,
             top_p: float, max_tokens: int, seed: int, json_path: Path | None, force: bool) -> None:
    """Answer one PROMPT, streamed to stdout.

    \b
    Example:
      caa-local generate "How was your day?" --vector sentiment:-4 --json out.json
    """
    from caa_local.core.atomic import check_writable, write_json

    if json_path is not None:
        check_writable(json_path, force)
    engine, sampling = _setup(model_path, n_ctx, n_threads, n_gpu_layers, vectors, multiplier, layers,
                              positions, any_arch, temperature, top_p, max_tokens, seed, chat_template, when)
    from caa_local.chat.repl import ChatSession

    session = ChatSession(engine, sampling, system=system, any_arch=any_arch, positions=positions)
    result = session.ask(prompt)
    if json_path is not None:
        write_json(json_path, {**session.to_dict(), "prompt": prompt, "text": result.text, "steering": result.steering,
                               "conditions": result.conditions,
                               "stop_reason": result.stop_reason, "n_prompt_tokens": result.n_prompt_tokens,
                               "prompt_seconds": result.prompt_seconds, "decode_seconds": result.decode_seconds,
                               "tokens_per_second": result.decode_tokens_per_second}, force=force)
    if result.conditions:
        from caa_local.chat.conditions import describe_report

        warn(f"[{describe_report(result.conditions)}]")
    if result.stop_reason == "context":
        warn(f"Note: the answer stopped when the context of {engine.n_ctx} tokens filled "
             "(--ctx enlarges it)")
    if result.stop_reason == "interrupted":
        warn("Interrupted.")
        raise SystemExit(130)
