"""The `caa-local` command: a thin Click layer over the library.

Commands live in their own modules and are imported only when run, so `caa-local chat`
starts without loading torch, matplotlib or the evaluation code. Library errors
(``CaaError``) become one ``Error: ...`` line and exit code 1; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from caa_local import __version__
from caa_local.cli.shared import BACKEND_HELP
from caa_local.core.errors import CaaError

# name -> ("module:attribute" of a click.Command, one-line help shown by --help)
COMMANDS = {
    "chat": ("caa_local.cli.chat:chat", "Chat with live steering (the main job)."),
    "generate": ("caa_local.cli.chat:generate", "Answer one prompt, steered."),
    "extract": ("caa_local.cli.extract:extract", "Extract a CAA vector from A/B data (llama.cpp on a GGUF, or torch)."),
    "calibrate": ("caa_local.cli.calibrate:calibrate", "Find a vector's layer and safe strength; store them in it."),
    "condition": ("caa_local.cli.condition:condition", "Condition vectors (CAST): steer only prompts about something."),
    "normalize": ("caa_local.cli.extract:normalize", "Normalize vectors across behaviors per layer."),
    "vector": ("caa_local.cli.vector:vector", "Inspect, list and combine vector files."),
    "eval": ("caa_local.cli.eval:eval_group", "A/B, open-ended, MMLU and TruthfulQA under steering."),
    "analyze": ("caa_local.cli.analyze:analyze", "PCA, cosine and steerability analyses."),
    "bench": ("caa_local.cli.bench:bench", "Benchmarks: every speed claim as ratios from one run."),
    "serve": ("caa_local.cli.serve:serve", "OpenAI-compatible server with per-request steering, and a page."),
    "rpc-worker": ("caa_local.cli.rpc:rpc_worker", "Lend this machine to a model split over llama.cpp RPC workers."),
}


class CaaClickError(click.ClickException):
    """A CaaError on its way to the user: one ``Error: ...`` line, exit code 1."""


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use; CaaError becomes one Error line.

    The conversion happens here rather than only in :func:`main`, so ``CliRunner().invoke(cli, ...)``
    behaves like the console script. With ``--debug`` the CaaError propagates (a traceback).
    """

    def __init__(self, *args: Any, lazy: dict[str, tuple[str, str]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module_name, attr = self.lazy[name][0].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CaaError as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            raise CaaClickError(str(exc)) from exc

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # From the table, so --help imports no command module.
        rows = [(name, self.lazy[name][1]) for name in sorted(self.lazy)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="caa-local")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Contrastive Activation Addition: extract steering vectors, steer GGUF models live."""
    ctx.obj = {"debug": debug}


# -- shared options ---------------------------------------------------------------------------
RPC_KEY = "caa_local.rpc"  # where --rpc leaves its endpoints in the click context, for open_engine


def _keep_rpc(ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> None:
    ctx.meta[RPC_KEY] = value


rpc_option = click.option(
    "--rpc", multiple=True, expose_value=False, callback=_keep_rpc, metavar="HOST:PORT[,HOST:PORT...]",
    help="llama.cpp RPC workers (caa-local rpc-worker, or llama.cpp's rpc-server) to offload layers to, "
         "in order; every layer unless --gpu-layers says how many. Repeatable.")


FLASH_ATTN_KEY = "caa_local.flash_attn"  # where --flash-attn leaves its choice, for open_engine


def _keep_flash_attn(ctx: click.Context, _param: click.Parameter, value: str) -> None:
    ctx.meta[FLASH_ATTN_KEY] = value


flash_attn_option = click.option(
    "--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
    expose_value=False, callback=_keep_flash_attn,
    help="llama.cpp's flash attention (auto: llama.cpp chooses per device, on for the CPU). off decodes "
         "long contexts on the CPU up to twice as fast; scores then depend slightly on batch shapes (README).")


def flash_attn_choice() -> str:
    """--flash-attn of the running command ("auto" outside a command)."""
    ctx = click.get_current_context(silent=True)
    return str(ctx.meta.get(FLASH_ATTN_KEY, "auto")) if ctx else "auto"


def rpc_endpoints() -> list[str]:
    """The --rpc endpoints of the running command, checked for form (none outside a command)."""
    from caa_local.engine.rpc import parse_endpoints

    ctx = click.get_current_context(silent=True)
    return parse_endpoints(ctx.meta.get(RPC_KEY, ()) if ctx else ())


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model/--ctx/--threads/--gpu-layers/--rpc, shared by every command that runs the engine."""
    options = [
        click.option("model_path", "--model", "-m", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, help="GGUF model file (default: SmolLM2-135M-Instruct Q4_1)."),
        click.option("n_ctx", "--ctx", type=click.IntRange(min=16), default=4096, show_default=True,
                     help="Context size in tokens."),
        click.option("n_threads", "--threads", "-t", type=int, default=0,
                     help="CPU threads (0, the default: all cores)."),
        click.option("n_gpu_layers", "--gpu-layers", type=int, default=0, show_default=True,
                     help="Layers to offload to GPU (-1: all), with a CUDA/Metal build of llama.cpp."),
        flash_attn_option,
        rpc_option,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def extraction_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--model/--backend/--ctx/--threads/--gpu-layers/--device/--force, shared by the commands that
    extract a vector from a GGUF (native) or a Hugging Face model (torch)."""
    options = [
        click.option("model_ref", "--model", "-m", default=None,
                     help="GGUF file, HF directory or hub id (default: the default GGUF model)."),
        click.option("backend", "--backend", type=click.Choice(["auto", "native", "torch"]), default="auto",
                     show_default=True, help=BACKEND_HELP),
        click.option("n_ctx", "--ctx", type=click.IntRange(min=16), default=4096, show_default=True,
                     help="native: context size in tokens (bounds the longest prompt)."),
        click.option("n_threads", "--threads", "-t", type=click.IntRange(min=0), default=0,
                     help="CPU threads (0, the default: all cores; torch: its own default)."),
        click.option("n_gpu_layers", "--gpu-layers", type=int, default=0, show_default=True,
                     help="native: layers to offload to GPU (-1: all), with a CUDA/Metal build of llama.cpp."),
        flash_attn_option,
        click.option("device", "--device", default="cpu", show_default=True,
                     help="torch: cpu, cuda, cuda:N, mps, or auto (accelerate device_map for big models)."),
        click.option("--force", is_flag=True, help="Overwrite OUT if it exists."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


any_arch_option = click.option(
    "any_arch", "--any-arch", is_flag=True,
    help="Accept a vector made for another architecture (its shapes must still fit the model).")


chat_template_option = click.option(
    "chat_template", "--chat-template", default=None, metavar="NAME|FILE",
    help="Chat template instead of the model's: chatml, llama2, base (the paper's Input:/Response: format) "
         "or a Jinja file (needed when the GGUF has none).")


def warn(message: str) -> None:
    """A warning or note for the user: stderr, so piped answers stay clean."""
    click.echo(message, err=True)


def open_engine(model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int,  # noqa: ANN201 - Engine, imported lazily
                chat_template: str | None = None, fmt: str = "chat"):
    """The engine for --model/--ctx/--threads/--gpu-layers/--rpc, rendering prompts with
    --chat-template (or --format base; else the GGUF's template, refused when it has none);
    warns when --ctx passes the training context."""
    if n_threads < 0:
        raise CaaError(f"--threads must be positive (or 0 for all cores), got {n_threads}")
    from caa_local.engine.engine import Engine

    rpc = rpc_endpoints()
    if rpc and n_gpu_layers == 0:
        n_gpu_layers = -1  # --rpc alone: every layer goes to the workers
    engine = Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, rpc=rpc,
                    flash_attn=flash_attn_choice())
    engine.use_template(chat_template, fmt)
    trained = engine.meta(f"{engine.architecture}.context_length")
    if trained.isdigit() and n_ctx > int(trained):
        warn(f"Warning: --ctx {n_ctx} is beyond the {int(trained)} tokens {engine.model_path.name} "
             "was trained on; expect worse answers past that point")
    return engine


def clamp_max_tokens(max_tokens: int, engine: Any) -> int:
    """--max-tokens, at most the context size (with a warning): an answer cannot outgrow it."""
    n_ctx = engine.n_ctx
    if max_tokens <= n_ctx:
        return max_tokens
    warn(f"Warning: --max-tokens {max_tokens} is larger than the context of {n_ctx} tokens; "
         f"using {n_ctx} (answers stop when the context fills; --ctx enlarges it)")
    return n_ctx


def warn_multipliers(multipliers: Any) -> None:
    """The absurd-multiplier warning (steering.multiplier_warning) for each value that earns it."""
    from caa_local.core.steering import multiplier_warning

    for scale in dict.fromkeys(multipliers):
        if warning := multiplier_warning(scale):
            warn(warning)


def load_vector_specs(specs: Sequence[str], multiplier: float | None = None) -> list[tuple[str, Any, float]]:
    """Read --vector NAME|FILE[:SCALE] options into (name, vector, scale), before any model loads."""
    from caa_local.core.locate import load_vector
    from caa_local.core.parsing import split_vector_spec
    from caa_local.core.steering import check_multiplier

    if multiplier is not None:
        check_multiplier(multiplier)
    loaded: list[tuple[str, Any, float]] = []
    for spec in specs:
        target, scale = split_vector_spec(spec)
        path, vector = load_vector(target)
        name = path.stem
        if any(name == other for other, _, _ in loaded):
            name = f"{name}-{len(loaded) + 1}"
        if scale is None:
            scale = multiplier if multiplier is not None else vector.recommended_multiplier() or 1.0
        loaded.append((name, vector, scale))
    return loaded


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="caa-local", standalone_mode=False)
    except click.exceptions.Abort as exc:
        # Click turns Ctrl-C into Abort; say so as the KeyboardInterrupt branch below does.
        click.echo("Interrupted." if isinstance(exc.__cause__, KeyboardInterrupt) else "Aborted.", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    except CaaError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except (OSError, ValueError, RuntimeError, MemoryError) as exc:
        if debug:
            raise
        click.echo(f"Error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
