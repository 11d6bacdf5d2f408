"""`caa-local extract` and `caa-local normalize`: making vector files."""

from __future__ import annotations

from pathlib import Path

import click

from caa_local.core.errors import CaaError


@click.command(name="extract")
@click.argument("dataset")
@click.option("model_ref", "--model", "-m", default=None,
              help="HF directory, hub id or .gguf file (default: the default GGUF model).")
@click.option("out", "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output GGUF (default: DATASET_NAME.gguf in the current directory).")
@click.option("batch_size", "--batch-size", "-b", type=click.IntRange(min=1), default=8, show_default=True,
              help="Pairs per forward pass.")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use at most N pairs.")
@click.option("part", "--split", type=click.Choice(["train", "all"]), default="train", show_default=True,
              help="Which part of the data: 'train' keeps the seeded validation split held out.")
@click.option("layers_spec", "--layers", default="all", show_default=True, help="Layers to extract.")
@click.option("read", "--read", type=click.Choice(["answer-letter", "answer-mean", "answer-text"]), default="answer-letter",
              show_default=True, help="Where to read: the answer letter (the paper), the mean over '(A', or the mean over the whole answer text (strong on small models).")
@click.option("device", "--device", default="cpu", show_default=True,
              help="cpu, cuda, cuda:N, mps, or auto (accelerate device_map for big models).")
@click.option("dtype", "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Torch dtype for the model.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
@click.option("run_calibrate", "--calibrate", is_flag=True,
              help="Then run a quick `caa-local calibrate` on the GGUF model (needs a .gguf --model or the default).")
def extract(dataset: str, model_ref: str | None, out: Path | None, batch_size: int, limit: int | None,
            part: str, layers_spec: str, read: str, device: str, dtype: str, force: bool,
            run_calibrate: bool) -> None:
    """Extract a CAA vector from DATASET (a behavior name or an A/B JSON file).

    \b
    Example:
      caa-local extract sycophancy --out syc.gguf
      caa-local extract my_pairs.json --model meta-llama/Llama-2-7b-chat-hf --device auto
    """
    from caa_local.core.atomic import check_writable
    from caa_local.core.datasets import load_ab, split
    from caa_local.core.layers import parse_layer_spec

    data = load_ab(dataset)
    out = out or Path(f"{data.name}.gguf")
    check_writable(out, force)
    if run_calibrate and model_ref is not None and not model_ref.endswith(".gguf"):
        raise CaaError(f"--calibrate steers a GGUF model with the native engine; {model_ref} is not one "
                       f"(extract, then run `caa-local calibrate {out} --model MODEL.gguf`)")
    items = split(data.items, part)[:limit]
    try:
        from caa_local.torch.extract import extract as run_extract
        from caa_local.torch.hf import chat_template_of, load_hf
    except ImportError as err:
        raise CaaError(f"extraction needs torch and transformers: pip install 'caa-local[extract]' ({err})") from None
    model, tokenizer, info = load_hf(model_ref, device=device, dtype=dtype)
    layers = parse_layer_spec(layers_spec, info.n_layer)
    click.echo(f"{info.name}: {info.n_layer} blocks, n_embd {info.n_embd}; {len(items)} pairs of {data.name}",
               err=True)
    vector = run_extract(model, tokenizer, chat_template_of(tokenizer), items, batch_size, layers, read,
                         behavior=data.name, dataset_sha256=data.sha256, info=info)
    vector = vector.with_metadata(split=part, dataset=str(data.path.name))
    vector.save(out, force=force)
    click.echo(f"wrote {out}: layers {vector.metadata['layers']}, {vector.metadata['n_pairs']} pairs")
    model_option = f" --model {model_ref}" if model_ref else ""
    if not run_calibrate:
        click.echo(f"next: `caa-local calibrate {out}{model_option}` chooses its layer and multiplier "
                   "(until then chat and generate steer every layer at x1)", err=True)
        return
    from caa_local.cli import open_engine
    from caa_local.cli.calibrate import calibration_settings, run_calibration
    from caa_local.eval.calibrate import load_data

    del model, tokenizer  # the native engine takes over; free the torch copy first
    settings = calibration_settings(True, metric=_metric_for(data.name))
    calibration_data = load_data(data.name, dataset, settings)
    engine = open_engine(Path(model_ref) if model_ref else None, 4096, 0, 0)
    run_calibration(out, None, force, engine, settings, calibration_data)


def _metric_for(behavior: str) -> str:
    return behavior if behavior in ("sentiment", "formality", "enthusiasm") else "p_match"


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
