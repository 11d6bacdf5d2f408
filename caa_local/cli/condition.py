"""`caa-local condition extract` and the condition branch of `caa-local calibrate` (CAST)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from caa_local.cli import extraction_options, warn
from caa_local.cli.shared import resolve_backend, target_path
from caa_local.core.errors import CaaError


@click.group(name="condition", context_settings={"help_option_names": ["-h", "--help"]})
def condition() -> None:
    """Condition vectors (CAST): steer only when the prompt is about something.

    \b
    Three commands make and use one:
      caa-local condition extract work --out work.gguf
      caa-local calibrate work.gguf
      caa-local chat --vector sentiment --when work.gguf
    """


def _native_reads(engine: Any, data: Any, parts: tuple[str, ...], layers: list[int], batch_size: int,
                  n_ctx: int) -> dict[str, tuple[Any, Any]]:
    from caa_local.cli.eval import progress_bar
    from caa_local.engine.condition_reads import prompt_reads

    out = {}
    for part in parts:
        pos, neg = data.part(part)
        with progress_bar(len(pos) + len(neg), f"read {part}", "prompt") as update:
            out[part] = (prompt_reads(engine, pos, layers, batch_size, n_ctx, update),
                         prompt_reads(engine, neg, layers, batch_size, n_ctx, update))
    return out


def open_reading_engine(model_path: Path | None, n_threads: int, n_gpu_layers: int) -> Any:
    """An engine whose own context stays small: the reader makes its own (up to --ctx tokens)."""
    from caa_local.cli import open_engine

    return open_engine(model_path, 512, n_threads, n_gpu_layers)


@condition.command(name="extract")
@click.argument("sources", nargs=-1, required=True, metavar="DATASET | POS NEG")
@extraction_options
@click.option("out", "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output GGUF (default: NAME.gguf in the current directory).")
@click.option("layers_spec", "--layers", default=None, metavar="SPEC",
              help="Layers to extract (default: 1 .. n_layer-2, every layer a condition can be read at).")
@click.option("limit", "--limit", type=click.IntRange(min=5), default=None, help="Use at most N prompts a side.")
@click.option("batch_size", "--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True,
              help="Prompts per forward pass.")
@click.option("run_calibrate", "--calibrate", is_flag=True,
              help="Then calibrate it (layer, threshold, comparison) on the GGUF model.")
def extract(sources: tuple[str, ...], model_ref: str | None, backend: str, out: Path | None,
            layers_spec: str | None, limit: int | None, batch_size: int, n_ctx: int, n_threads: int,
            n_gpu_layers: int, device: str, force: bool, run_calibrate: bool) -> None:
    """Extract a condition vector from prompts with and without the condition.

    DATASET is a packaged condition (work) or a JSON file {"matching": [...], "not_matching":
    [...]}; POS NEG are two prompt sources: JSON lists of prompts, A/B files, or behavior names
    (their questions without the choices). The hidden states are averaged over each prompt's
    user message; PCA (CAST's) and the mean difference are both tried on the train prompts and
    the one that separates the held-out val prompts better is kept.

    \b
    Example:
      caa-local condition extract work --out work.gguf --calibrate
      caa-local condition extract refusal myopic-reward --limit 150 --out topic.gguf
      caa-local condition extract harmful.json harmless.json --model my-model.gguf
    """
    from caa_local.core.atomic import check_writable
    from caa_local.core.condition_data import load_condition_data
    from caa_local.core.condition_fit import candidate_layers, check_layers, fit
    from caa_local.core.layers import parse_layer_spec

    backend = resolve_backend(backend, model_ref)
    data = load_condition_data(sources, limit)
    out = out or Path(f"{data.name}.gguf")
    check_writable(out, force)
    if run_calibrate and model_ref is not None and not model_ref.endswith(".gguf"):
        raise CaaError(f"--calibrate reads the GGUF model natively; {model_ref} is not one")
    meta = {"behavior": data.name, "dataset": data.source, "dataset_sha256": data.sha256, "backend": backend,
            **({"limit": str(limit)} if limit is not None else {})}
    if backend == "native":
        from caa_local.core.extraction import quantization_name
        from caa_local.core.locate import cached_sha256

        engine = open_reading_engine(Path(model_ref) if model_ref else None, n_threads, n_gpu_layers)
        layers = check_layers(parse_layer_spec(layers_spec, engine.n_layer) if layers_spec
                              else candidate_layers(engine.n_layer), engine.n_layer)
        warn(f"backend: native (llama.cpp on {engine.model_path.name}); {len(data.matching)} + "
             f"{len(data.not_matching)} prompts of {data.name}")
        reads = _native_reads(engine, data, ("train", "val"), layers, batch_size, n_ctx)
        hint = engine.architecture
        meta.update(model=engine.model_path.name, model_sha256=cached_sha256(engine.model_path),
                    quantization=quantization_name(engine.meta("general.file_type")))
    else:
        reads, hint, layers, info = _torch_reads(model_ref, data, layers_spec, batch_size, n_threads, device)
        meta.update(model=info.name, model_sha256=info.sha256 or "")
    vector = fit(reads["train"], reads["val"], layers, hint, meta)
    vector.save(out, force=force)
    comparison = vector.metadata["method_comparison"]
    click.echo(f"wrote {out}: condition {data.name!r}, layers {vector.metadata['layers']}, "
               f"method {vector.metadata['method']} (held-out F1 by method: {comparison})")
    if not run_calibrate:
        click.echo(f"next: `caa-local calibrate {out}` chooses its layer, threshold and comparison", err=True)
        return
    if backend != "native":
        engine = open_reading_engine(Path(model_ref) if model_ref else None, n_threads, n_gpu_layers)
    calibrate_condition(out, None, True, engine, batch_size, n_ctx)


def _torch_reads(model_ref: str | None, data: Any, layers_spec: str | None, batch_size: int, n_threads: int,
                 device: str) -> tuple[dict[str, tuple[Any, Any]], str, list[int], Any]:
    from caa_local.core.condition_fit import candidate_layers, check_layers
    from caa_local.core.layers import parse_layer_spec

    try:
        from caa_local.torch.condition import prompt_reads
        from caa_local.torch.hf import chat_template_of, load_hf, set_threads
    except ImportError as err:
        raise CaaError(f"--backend torch needs torch and transformers: pip install 'caa-local[extract]' ({err})") from None
    set_threads(n_threads)
    model, tokenizer, info = load_hf(model_ref, device=device, dtype="float32")
    layers = check_layers(parse_layer_spec(layers_spec, info.n_layer) if layers_spec
                          else candidate_layers(info.n_layer), info.n_layer)
    template = chat_template_of(tokenizer)
    warn(f"backend: torch (transformers, float32); {info.name}; {len(data.matching)} + "
         f"{len(data.not_matching)} prompts of {data.name}")
    reads = {}
    for part in ("train", "val"):
        pos, neg = data.part(part)
        reads[part] = (prompt_reads(model, tokenizer, template, pos, layers, batch_size),
                       prompt_reads(model, tokenizer, template, neg, layers, batch_size))
    return reads, info.arch, layers, info


def calibrate_condition(vector_path: Path, out: Path | None, force: bool, engine: Any, batch_size: int = 8,
                        n_ctx: int = 4096, dataset: tuple[str, ...] | None = None, limit: int | None = None,
                        json_path: Path | None = None) -> dict[str, Any]:
    """Calibrate a condition file on ``engine``'s model (CAST's grid search on its val prompts),
    write it, print the card; the summary back."""
    from caa_local.core.atomic import write_json
    from caa_local.core.condition import calibration_of, require_condition
    from caa_local.core.condition_data import load_condition_data
    from caa_local.core.condition_fit import calibrate, card_lines, check_layers
    from caa_local.core.errors import ModelMismatchError
    from caa_local.core.vector import ControlVector

    vector = ControlVector.load(vector_path)
    require_condition(str(vector_path), vector)
    target = target_path(vector_path, out, force, calibration_of(vector) is not None)
    vector.check_fits(engine.n_embd, engine.n_layer, str(vector_path))
    if vector.model_hint != engine.architecture:
        raise ModelMismatchError(f"{vector_path}: made for a {vector.model_hint!r} model, this one is "
                                 f"{engine.architecture!r}")
    sources = dataset or tuple(s for s in vector.metadata.get("dataset", "").split(",") if s)
    if not sources:
        raise CaaError(f"{vector_path}: records no dataset; pass --dataset")
    data = load_condition_data(sources, limit if limit is not None else _recorded_limit(vector))
    layers = check_layers([layer for layer in vector.layers if layer <= engine.n_layer - 2], engine.n_layer)
    reads = _native_reads(engine, data, ("val", "test"), layers, batch_size, n_ctx)
    calibrated, summary = calibrate(vector, reads["val"], reads["test"], layers)
    calibrated.save(target, force=True)
    if json_path is not None:
        write_json(json_path, summary, force=force)
    for line in card_lines(vector.metadata.get("behavior") or vector_path.stem, summary):
        click.echo(line)
    click.echo(f"wrote {target}")
    return summary


def _recorded_limit(vector: Any) -> int | None:
    value = vector.metadata.get("limit", "")
    return int(value) if value.isdigit() else None
