"""`caa-local vector ...`: inspect, list, combine and check control-vector files."""

from __future__ import annotations

from pathlib import Path

import click

from caa_local.core.layers import format_layers, parse_layer_spec


@click.group(name="vector")
def vector() -> None:
    """Inspect and combine control-vector files (GGUF, as llama.cpp reads them)."""


@vector.command(name="info")
@click.argument("name_or_path")
def vector_info(name_or_path: str) -> None:
    """Show a vector's layers, norms and metadata.

    \b
    Example:
      caa-local vector info sentiment
    """
    from caa_local.core.locate import load_vector

    path, vec = load_vector(name_or_path)
    click.echo(f"file:        {path}")
    click.echo(f"model hint:  {vec.model_hint}")
    click.echo(f"n_embd:      {vec.n_embd}")
    click.echo(f"layers:      {format_layers(vec.layers)} ({len(vec.layers)})")
    norms = vec.norms()
    click.echo("norms:       " + ", ".join(f"{layer}:{norm:.2f}" for layer, norm in norms.items()))
    for key, value in sorted(vec.metadata.items()):
        click.echo(f"{key + ':':<24} {value}")


@vector.command(name="list")
def vectors_list() -> None:
    """List the shipped vectors with their recommended layer and multiplier."""
    from caa_local.core.locate import load_vector, shipped_vector_names

    names = shipped_vector_names()
    if not names:
        click.echo("no shipped vectors found")
    for name in names:
        vec = load_vector(name)[1]
        if vec.kind == "condition":
            click.echo(f"{name:<24} condition at layer {vec.metadata.get('condition_layer', '-')} "
                       f"(use with --when {name})")
            continue
        layer = vec.recommended_layer()
        mult = vec.recommended_multiplier()
        click.echo(
            f"{name:<24} layer {layer if layer is not None else '-':<4} "
            f"multiplier {mult if mult is not None else '-':<6} {vec.metadata.get('behavior', '')}"
        )


@vector.command(name="combine")
@click.argument("terms", nargs=-1, required=True)
@click.option("out", "--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output GGUF file.")
@click.option("layers_spec", "--layers", default=None, help="Keep only these layers, e.g. '10-14'.")
@click.option("--force", is_flag=True, help="Overwrite OUT if it exists.")
def vector_combine(terms: tuple[str, ...], out: Path, layers_spec: str | None, force: bool) -> None:
    """Write the weighted sum of vectors: TERMS are NAME|FILE[:SCALE].

    \b
    Example:
      caa-local vector combine sentiment:1 enthusiasm:-0.5 --out mix.gguf
    """
    from caa_local.core.atomic import check_writable
    from caa_local.core.locate import load_vector
    from caa_local.core.parsing import split_vector_spec

    check_writable(out, force)
    parsed = [split_vector_spec(term) for term in terms]  # every scale checked before any file is read
    total = None
    calibrated = False
    for name, scale in parsed:
        vec = load_vector(name)[1]
        calibrated = calibrated or vec.calibration() is not None
        vec = vec * (1.0 if scale is None else scale)  # a calibration follows a single term's scale
        total = vec if total is None else total + vec
    assert total is not None
    if calibrated and total.calibration() is None:
        click.echo("Note: the calibration of the inputs does not hold for their sum and was dropped "
                   f"(run `caa-local calibrate {out}`)", err=True)
    if layers_spec:
        total = total.only(parse_layer_spec(layers_spec))
    total.with_metadata(combined_from=" + ".join(terms)).save(out, force=force)
    click.echo(f"wrote {out} ({format_layers(total.layers)})")
