"""`caa-local extract` and `caa-local normalize`: making vector files."""

from __future__ import annotations

from pathlib import Path

import click

from caa_local.cli import chat_template_option, extraction_options, rpc_option
from caa_local.cli.shared import resolve_backend
from caa_local.core.errors import CaaError


def _torch_only(ctx: click.Context, backend: str, names: tuple[str, ...]) -> None:
    for name in names:
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT:
            raise CaaError(f"--{name.replace('_', '-')} applies to --backend torch, not {backend}")


@click.command(name="extract")
@click.argument("dataset")
@extraction_options
@click.option("out", "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output GGUF (default: DATASET_NAME.gguf in the current directory).")
@click.option("batch_size", "--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True,
              help="Pairs per forward pass (native: pairs decoded side by side, within a 256 MiB KV cache).")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use at most N pairs.")
@click.option("part", "--split", type=click.Choice(["train", "all"]), default="train", show_default=True,
              help="Which part of the data: 'train' keeps the seeded validation split held out.")
@click.option("layers_spec", "--layers", default="all", show_default=True, help="Layers to extract.")
@click.option("read", "--read", type=click.Choice(["answer-letter", "answer-mean", "answer-text"]), default="answer-letter",
              show_default=True, help="Where to read: the answer letter (the paper), the mean over '(A', or the mean over the whole answer text (strong on small models).")
@click.option("dtype", "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="torch: dtype for the model.")
@rpc_option
@chat_template_option
@click.option("run_calibrate", "--calibrate", is_flag=True,
              help="Then run a quick `caa-local calibrate` on the GGUF model (needs a .gguf --model or the default).")
@click.pass_context
def extract(ctx: click.Context, dataset: str, model_ref: str | None, backend: str, out: Path | None,
            batch_size: int, limit: int | None, part: str, layers_spec: str, read: str, device: str, dtype: str,
            n_ctx: int, n_threads: int, n_gpu_layers: int, chat_template: str | None, force: bool,
            run_calibrate: bool) -> None:
    """Extract a CAA vector from DATASET (a behavior name or an A/B JSON file).

    \b
    Example:
      caa-local extract sycophancy --out syc.gguf
      caa-local extract sycophancy --model llama-2-7b-chat.Q4_K_M.gguf --backend native --out syc.gguf
      caa-local extract my_pairs.json --model meta-llama/Llama-2-7b-chat-hf --device auto
    """
    from caa_local.core.atomic import check_writable
    from caa_local.core.datasets import load_ab, split
    from caa_local.core.layers import parse_layer_spec

    backend = resolve_backend(backend, model_ref)
    if backend == "native":
        _torch_only(ctx, backend, ("device", "dtype"))
    data = load_ab(dataset)
    out = out or Path(f"{data.name}.gguf")
    check_writable(out, force)
    if run_calibrate and model_ref is not None and not model_ref.endswith(".gguf"):
        raise CaaError(f"--calibrate steers a GGUF model with the native engine; {model_ref} is not one "
                       f"(extract, then run `caa-local calibrate {out} --model MODEL.gguf`)")
    items = split(data.items, part)[:limit]
    if not items:
        raise CaaError(f"{data.path}: no A/B pairs in the {part!r} part")
    if backend == "native":
        vector = _extract_native(model_ref, items, data, batch_size, layers_spec, read, n_ctx, n_threads, n_gpu_layers,
                                 chat_template)
    else:
        try:
            from caa_local.torch.extract import extract as run_extract
            from caa_local.torch.hf import chat_template_of, load_hf, set_threads
        except ImportError as err:
            raise CaaError(f"--backend torch needs torch and transformers: pip install 'caa-local[extract]' "
                           f"({err}); or use --backend native with a GGUF") from None
        set_threads(n_threads)
        model, tokenizer, info = load_hf(model_ref, device=device, dtype=dtype)
        template = chat_template_of(tokenizer, chat_template, where=info.name)
        layers = parse_layer_spec(layers_spec, info.n_layer)
        click.echo(f"backend: torch (transformers, {dtype}); {info.name}: {info.n_layer} blocks, "
                   f"n_embd {info.n_embd}; {len(items)} pairs of {data.name}", err=True)
        vector = run_extract(model, tokenizer, template, items, batch_size, layers, read,
                             behavior=data.name, dataset_sha256=data.sha256, info=info)
        del model, tokenizer  # free the torch copy before a --calibrate loads the GGUF
    vector = vector.with_metadata(split=part, dataset=str(data.path.name))
    vector.save(out, force=force)
    click.echo(f"wrote {out}: layers {vector.metadata['layers']}, {vector.metadata['n_pairs']} pairs, "
               f"{vector.metadata['backend']} backend")
    model_option = f" --model {model_ref}" if model_ref else ""
    if not run_calibrate:
        click.echo(f"next: `caa-local calibrate {out}{model_option}` chooses its layer and multiplier "
                   "(until then chat and generate steer every layer at x1)", err=True)
        return
    from caa_local.cli import open_engine
    from caa_local.cli.calibrate import calibration_settings, run_calibration
    from caa_local.eval.calibrate import load_data

    settings = calibration_settings(True, metric=_metric_for(data.name))
    calibration_data = load_data(data.name, dataset, settings)
    engine = open_engine(Path(model_ref) if model_ref else None, 4096, 0, 0, chat_template)
    run_calibration(out, None, force, engine, settings, calibration_data)


def _metric_for(behavior: str) -> str:
    return behavior if behavior in ("sentiment", "formality", "enthusiasm") else "p_match"


def _extract_native(model_ref: str | None, items: list, data: object, batch_size: int, layers_spec: str,
                    read: str, n_ctx: int, n_threads: int, n_gpu_layers: int,
                    chat_template: str | None):  # noqa: ANN202 - ControlVector
    from caa_local.cli import open_engine
    from caa_local.cli.eval import progress_bar
    from caa_local.core.extraction import quantization_name
    from caa_local.core.layers import parse_layer_spec
    from caa_local.engine.reads import extract as run_extract

    # The reader makes its own context (up to --ctx tokens a prompt); the engine's stays small.
    engine = open_engine(Path(model_ref) if model_ref else None, 64, n_threads, n_gpu_layers, chat_template)
    layers = parse_layer_spec(layers_spec, engine.n_layer)
    quant = quantization_name(engine.meta("general.file_type"))
    click.echo(f"backend: native (llama.cpp on {engine.model_path.name}, {quant}; no torch); "
               f"{engine.n_layer} blocks, n_embd {engine.n_embd}; {len(items)} pairs of {data.name}", err=True)
    with progress_bar(len(items), "extract", "pair") as update:
        return run_extract(engine, items, batch_size, layers, read, update, behavior=data.name,
                           dataset_sha256=data.sha256, n_ctx=n_ctx)


@click.command(name="normalize")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("out_dir", "--out-dir", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory for the normalized files (same names).")
@click.option("--force", is_flag=True, help="Overwrite files in OUT_DIR.")
def normalize(files: tuple[Path, ...], out_dir: Path, force: bool) -> None:
    """Rescale each layer of every vector to the mean norm across FILES (the paper's normalization).

    \b
    Example:
      caa-local normalize raw/*.gguf --out-dir vectors/
    """
    from caa_local.core.atomic import check_writable
    from caa_local.core.normalize import normalize as run_normalize
    from caa_local.core.vector import ControlVector

    if len(files) < 2:
        raise CaaError("normalization compares behaviors: give at least two vector files")
    names = [f.stem for f in files]
    if len(set(names)) != len(names):
        raise CaaError("two input files share a name; the outputs would collide")
    targets = [out_dir / f.name for f in files]
    for target in targets:
        check_writable(target, force)
    vectors = {f.stem: ControlVector.load(f) for f in files}
    for target, (name, vec) in zip(targets, run_normalize(vectors).items()):
        vec.save(target, force=force)
        click.echo(f"wrote {target}")
