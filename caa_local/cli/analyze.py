"""`caa-local analyze cosine|behaviors|pca|steerability`: the paper's analyses of vectors.

Thin commands over caa_local.eval.analyze (numpy) and caa_local.eval.plots (matplotlib, lazily).
Only `pca` needs torch: it reads per-example activations with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from caa_local.core.errors import CaaError

OUT = click.Path(dir_okay=False, path_type=Path)


@click.group(name="analyze")
def analyze() -> None:
    """Cosine similarities, PCA of activations and steerability of CAA vectors."""


def _check(force: bool, *paths: Path | None) -> None:
    from caa_local.core.atomic import check_writable

    for path in paths:
        if path is not None:
            check_writable(path, force)


@analyze.command(name="cosine")
@click.argument("vector_name")
@click.option("out", "--out", type=OUT, default=None, help="Write a layer x layer heatmap PNG.")
@click.option("force", "--force", is_flag=True, help="Overwrite the output file.")
def analyze_cosine(vector_name: str, out: Path | None, force: bool) -> None:
    """Cosine similarity of one vector's directions across layers.

    \b
    Example:
        caa-local analyze cosine vectors/sycophancy.gguf --out cosine.png
    """
    from caa_local.core.locate import load_vector
    from caa_local.eval.analyze import layer_cosines

    _check(force, out)
    vector_path, vector = load_vector(vector_name)
    layers, matrix = layer_cosines(vector)
    if len(layers) > 1:
        neighbours = [matrix[i, i + 1] for i in range(len(layers) - 1)]
        click.echo(f"{vector_path.name}: {len(layers)} layers; cosine of adjacent layers "
                   f"{min(neighbours):.2f}..{max(neighbours):.2f}, first vs last {matrix[0, -1]:.2f}")
    norms = vector.norms()
    click.echo("norms: " + ", ".join(f"{layer}:{norms[layer]:.1f}" for layer in layers))
    if out:
        from caa_local.eval.plots import heatmap

        heatmap(matrix, [str(x) for x in layers], out, f"{vector_path.stem}: cosine across layers", force=force)
        click.echo(f"wrote {out}")


@analyze.command(name="behaviors")
@click.argument("vector_names", nargs=-1, required=True)
@click.option("layer", "--layer", type=int, required=True, help="Layer to compare the vectors at.")
@click.option("out", "--out", type=OUT, default=None, help="Write a behavior x behavior heatmap PNG.")
@click.option("force", "--force", is_flag=True, help="Overwrite the output file.")
def analyze_behaviors(vector_names: tuple[str, ...], layer: int, out: Path | None, force: bool) -> None:
    """Cosine similarity between behaviors' vectors at one layer.

    \b
    Example:
        caa-local analyze behaviors vectors/*.gguf --layer 15 --out behaviors.png
    """
    from caa_local.core.locate import load_vector
    from caa_local.eval.analyze import behavior_cosines, format_matrix

    _check(force, out)
    vectors = {}
    for name_or_path in vector_names:
        path, vector = load_vector(name_or_path)
        name = vector.metadata.get("behavior") or path.stem
        vectors[name if name not in vectors else path.stem] = vector
    names, matrix = behavior_cosines(vectors, layer)
    click.echo(f"cosine similarity at layer {layer}")
    click.echo(format_matrix(names, matrix))
    if out:
        from caa_local.eval.plots import heatmap

        heatmap(matrix, names, out, f"cosine similarity of behaviors at layer {layer}", force=force)
        click.echo(f"wrote {out}")


@analyze.command(name="pca")
@click.option("dataset", "--dataset", "-d", required=True, metavar="BEHAVIOR|FILE.json", help="A/B questions.")
@click.option("layer_spec", "--layers", default="all", show_default=True, metavar="SPEC",
              help="Layers to project, e.g. 5,10,15 or all.")
@click.option("out", "--out", type=OUT, required=True, help="Write the grid of PCA scatters (PNG).")
@click.option("model_path", "--model", "-m", default=None,
              help="GGUF file, Hugging Face directory or hub id (default: the default model).")
@click.option("part", "--split", type=click.Choice(["val", "train", "all"]), default="train", show_default=True,
              help="Part of the dataset.")
@click.option("limit", "--limit", type=click.IntRange(min=2), default=100, show_default=True,
              help="Use the first N questions.")
@click.option("batch_size", "--batch-size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Pairs per forward pass.")
@click.option("device", "--device", default="cpu", show_default=True, help="torch device (cpu, cuda, auto).")
@click.option("force", "--force", is_flag=True, help="Overwrite the output file.")
def analyze_pca(dataset: str, layer_spec: str, out: Path, model_path: str | None, part: str, limit: int,
                batch_size: int, device: str, force: bool) -> None:
    """PCA per layer of the activations at the answer letter, matching vs not matching.

    \b
    Example:
        caa-local analyze pca --dataset sycophancy --layers 2,8,14,20 --out pca.png
    """
    from caa_local.eval.analyze import example_activations, pair_accuracy, pca_layers
    from caa_local.core.datasets import load_ab, split
    from caa_local.core.layers import parse_layer_spec

    _check(force, out)
    data = load_ab(dataset)
    items = split(data.items, part)[:limit]
    if len(items) < 2:
        raise CaaError(f"{data.path}: PCA needs at least 2 questions, the {part!r} part has {len(items)}")
    from caa_local.torch.hf import chat_template_of, load_hf

    model, tokenizer, info = load_hf(model_path, device=device)
    layers = parse_layer_spec(layer_spec, info.n_layer)
    acts = example_activations(model, tokenizer, chat_template_of(tokenizer), items, layers, batch_size)
    projections = pca_layers(acts, layers)
    click.echo(f"{data.name} ({part}, n={len(items)} pairs), {info.name}")
    click.echo("layer  PC1   PC2   held-out pair accuracy")
    for i, (layer, p) in enumerate(projections.items()):
        held_out = pair_accuracy(acts["matching"][:, i], acts["not_matching"][:, i],
                                 [it.matching_letter for it in items])
        click.echo(f"{layer:>5} {p.explained[0]:5.2f} {p.explained[1]:5.2f}  {held_out:.2f}")
    click.echo("(PC1, PC2: explained variance; pair accuracy: how often the mean difference of half the "
               "pairs, balanced over answer letters, ranks the other half's matching answer higher)")
    from caa_local.eval.plots import pca_grid

    letters = [it.matching_letter for it in items] + [it.not_matching_letter for it in items]
    pca_grid({layer: (p.xy, _labels(len(items))) for layer, p in projections.items()}, out,
             f"{data.name}: activations at the answer letter (PCA per layer)", letters, force)
    click.echo(f"wrote {out}")


def _labels(n: int) -> Any:
    import numpy as np

    return np.r_[np.ones(n, bool), np.zeros(n, bool)]


@analyze.command(name="steerability")
@click.argument("results_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def analyze_steerability(results_path: Path) -> None:
    """Steerability (slope of the mean logit difference) and anti-steerable share per layer.

    \b
    Example:
        caa-local eval ab --vector sycophancy --dataset sycophancy --json syc.json
        caa-local analyze steerability syc.json
    """
    from caa_local.eval.analyze import steerability_table

    try:
        data = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CaaError(f"{results_path}: cannot read results: {err}") from None
    if not isinstance(data, dict):
        raise CaaError(f"{results_path}: expected an `eval ab --json` object")
    try:
        rows = steerability_table(data)
    except CaaError as err:
        raise CaaError(f"{results_path}: {err}") from None
    click.echo(f"{data.get('vector', '')} on {data.get('dataset', '')} (n={rows[0]['n'] if rows else 0})")
    click.echo("layer  steerability  anti-steerable  p(match) range")
    for row in rows:
        slope = "n/a" if row["steerability"] is None else f"{row['steerability']:+.3f}"
        anti = "n/a" if row["anti_steerable"] is None else f"{row['anti_steerable']:.2f}"
        click.echo(f"{row['layer']:>5}  {slope:>12}  {anti:>14}  {row['p_match_min']:.2f}..{row['p_match_max']:.2f}")
