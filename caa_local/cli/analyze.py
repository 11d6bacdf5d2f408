"""`caa-local analyze cosine|behaviors|tokens|pca|steerability`: the paper's analyses of vectors.

Thin commands over caa_local.eval.analyze (numpy) and caa_local.eval.plots (matplotlib, lazily).
`pca` reads per-example activations with llama.cpp (a GGUF) or transformers (--backend torch);
`tokens` needs torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from caa_local.cli import chat_template_option
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
@click.option("layer_spec", "--layers", "--layer", required=True, metavar="SPEC",
              help="One layer (e.g. 15): the behaviors' cosine matrix there; several (e.g. all): cosine per "
                   "layer for each pair, as the paper compares base- and chat-model vectors.")
@click.option("out", "--out", type=OUT, default=None,
              help="Write a heatmap PNG (one layer) or cosine-vs-layer lines (several).")
@click.option("json_path", "--json", type=OUT, default=None, help="Write the per-layer cosines as JSON.")
@click.option("force", "--force", is_flag=True, help="Overwrite the output file.")
def analyze_behaviors(vector_names: tuple[str, ...], layer_spec: str, out: Path | None,
                      json_path: Path | None, force: bool) -> None:
    """Cosine similarity between vectors: behaviors at one layer, or pairs across layers.

    \b
    Example:
        caa-local analyze behaviors vectors/*.gguf --layers 15 --out behaviors.png
        caa-local analyze behaviors base/sycophancy.gguf chat/sycophancy.gguf --layers all --out base-chat.png
    """
    from caa_local.core.locate import load_vector
    from caa_local.eval.analyze import behavior_cosines, format_matrix

    _check(force, out, json_path)
    layer = int(layer_spec) if layer_spec.strip().isdigit() else None
    vectors = {}
    for name_or_path in vector_names:
        path, vector = load_vector(name_or_path)
        name = vector.metadata.get("behavior") or path.stem
        vectors[name if name not in vectors else str(path)] = vector
    if layer is not None:
        names, matrix = behavior_cosines(vectors, layer)
        click.echo(f"cosine similarity at layer {layer}")
        click.echo(format_matrix(names, matrix))
        if out:
            from caa_local.eval.plots import heatmap

            heatmap(matrix, names, out, f"cosine similarity of behaviors at layer {layer}", force=force)
            click.echo(f"wrote {out}")
        return
    from itertools import combinations

    from caa_local.core.layers import parse_layer_spec
    from caa_local.eval.experiments import layer_similarity

    if len(vectors) < 2:
        raise CaaError(f"comparing vectors needs at least two, got {len(vectors)}")
    wanted = None if str(layer_spec).strip().lower() == "all" else set(parse_layer_spec(str(layer_spec)))
    results = []
    for a, b in combinations(vectors, 2):
        sim = layer_similarity(vectors[a], vectors[b], (a, b))
        if wanted is not None:
            keep = [i for i, l in enumerate(sim.layers) if l in wanted]
            sim.layers, sim.cosine = [sim.layers[i] for i in keep], [sim.cosine[i] for i in keep]
        results.append(sim)
        click.echo(sim.table())
    if json_path:
        from caa_local.core.atomic import write_json

        write_json(json_path, {"pairs": [r.to_json() for r in results]}, force)
    if out:
        from caa_local.eval.plots import lines_vs_layer

        lines_vs_layer({f"{r.names[0]} vs {r.names[1]}": (r.layers, r.cosine) for r in results}, out,
                       "cosine similarity", "vector similarity per layer", (-1, 1), force)
        click.echo(f"wrote {out}")


@analyze.command(name="tokens")
@click.argument("prompt")
@click.option("vector_name", "--vector", "-v", required=True, metavar="NAME|FILE", help="The vector.")
@click.option("layer", "--layers", "--layer", type=int, default=None, metavar="LAYER",
              help="Layer (default: the vector's recommended one).")
@click.option("answer", "--answer", default="", help="Text written into the assistant turn after the prompt.")
@click.option("model_path", "--model", "-m", default=None,
              help="GGUF file, Hugging Face directory or hub id (default: the default model).")
@chat_template_option
@click.option("fmt", "--format", type=click.Choice(["chat", "base"]), default="chat", show_default=True,
              help="chat template, or the paper's base-model format.")
@click.option("out", "--out", type=OUT, default=None, help="Write the per-token bar plot (PNG).")
@click.option("json_path", "--json", type=OUT, default=None, help="Write tokens and cosines as JSON.")
@click.option("device", "--device", default="cpu", show_default=True, help="torch device (cpu, cuda, auto).")
@click.option("force", "--force", is_flag=True, help="Overwrite the output files.")
def analyze_tokens(prompt: str, vector_name: str, layer: int | None, answer: str, model_path: str | None,
                   chat_template: str | None, fmt: str, out: Path | None, json_path: Path | None, device: str,
                   force: bool) -> None:
    """Cosine of the vector with each token's activation at its layer (the paper's per-token figure).

    \b
    Example:
        caa-local analyze tokens "Is it ever right to lie?" --vector sycophancy --answer "(A" --out tokens.png
    """
    from caa_local.core.locate import load_vector

    _check(force, out, json_path)
    vector_path, vector = load_vector(vector_name)
    chosen = layer if layer is not None else vector.recommended_layer()
    if chosen is None:
        raise CaaError(f"{vector_path}: the vector records no recommended layer; pass --layers")
    from caa_local.torch.hf import chat_template_of, load_hf
    from caa_local.torch.token_view import token_similarity

    model, tokenizer, info = load_hf(model_path, device=device)
    template = chat_template_of(tokenizer, chat_template, fmt, info.name)
    result = token_similarity(model, tokenizer, template, vector, chosen, prompt, answer)
    click.echo(f"{vector_path.name} @ layer {chosen}, {info.name}: cosine per token "
               f"(steered from token {result.steer_from})")
    click.echo(result.table())
    if json_path:
        from caa_local.core.atomic import write_json

        write_json(json_path, result.to_json(), force)
    if out:
        from caa_local.eval.plots import token_bars

        token_bars(result.tokens, result.cosine, out, f"{vector_path.stem} @ layer {chosen}: cosine per token",
                   result.steer_from, force)
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
@click.option("backend", "--backend", type=click.Choice(["auto", "native", "torch"]), default="auto",
              show_default=True, help="Who reads the activations (as for extract: native for a GGUF).")
@click.option("device", "--device", default="cpu", show_default=True, help="torch device (cpu, cuda, auto).")
@click.option("n_threads", "--threads", "-t", type=click.IntRange(min=0), default=0,
              help="native: CPU threads (0, the default: all cores).")
@chat_template_option
@click.option("force", "--force", is_flag=True, help="Overwrite the output file.")
def analyze_pca(dataset: str, layer_spec: str, out: Path, model_path: str | None, part: str, limit: int,
                batch_size: int, backend: str, device: str, n_threads: int, chat_template: str | None,
                force: bool) -> None:
    """PCA per layer of the activations at the answer letter, matching vs not matching.

    \b
    Example:
        caa-local analyze pca --dataset sycophancy --layers 2,8,14,20 --out pca.png
    """
    from caa_local.cli.shared import resolve_backend
    from caa_local.eval.analyze import example_activations, pair_accuracy, pca_layers
    from caa_local.core.datasets import load_ab, split
    from caa_local.core.layers import parse_layer_spec

    _check(force, out)
    data = load_ab(dataset)
    items = split(data.items, part)[:limit]
    if len(items) < 2:
        raise CaaError(f"{data.path}: PCA needs at least 2 questions, the {part!r} part has {len(items)}")
    if resolve_backend(backend, model_path) == "native":
        from caa_local.cli import open_engine
        from caa_local.eval.analyze import example_activations_native

        engine = open_engine(Path(model_path) if model_path else None, 64, n_threads, 0, chat_template)
        layers, name = parse_layer_spec(layer_spec, engine.n_layer), f"{engine.model_path.name} (native)"
        acts = example_activations_native(engine, items, layers, batch_size)
    else:
        from caa_local.torch.hf import chat_template_of, load_hf

        model, tokenizer, info = load_hf(model_path, device=device)
        layers, name = parse_layer_spec(layer_spec, info.n_layer), f"{info.name} (torch)"
        template = chat_template_of(tokenizer, chat_template, where=info.name)
        acts = example_activations(model, tokenizer, template, items, layers, batch_size)
    projections = pca_layers(acts, layers)
    click.echo(f"{data.name} ({part}, n={len(items)} pairs), {name}")
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
