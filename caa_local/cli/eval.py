"""`caa-local eval ab|open-ended|mmlu|truthfulqa`: the paper's evaluations.

Thin commands: parse options, check output paths, one library call (caa_local.eval.ab),
echo a table. Progress bars go to stderr; output files are written atomically at the end,
so Ctrl-C leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from caa_local.cli import clamp_max_tokens, model_options, open_engine, warn_multipliers
from caa_local.core.errors import CaaError

OUT = click.Path(dir_okay=False, path_type=Path)
PAPER_MULTIPLIERS = "-1,-0.5,0,0.5,1"
OPEN_ENDED_MULTIPLIERS = "-2,-1.5,-1,0,1,1.5,2"
CAPABILITY_MULTIPLIERS = "-2,-1,0,1,2"
DEMO_METRIC = {"sentiment": "sentiment", "formality": "formality", "enthusiasm": "enthusiasm"}


@click.group(name="eval")
def eval_group() -> None:
    """Evaluate a steering vector as in the CAA paper (A/B, open-ended, capabilities)."""


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str) -> Iterator[Callable[[int], None]]:
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=None, leave=False) as bar:
        yield bar.update


def _outputs(force: bool, *paths: Path | None) -> None:
    from caa_local.core.atomic import check_writable

    for path in paths:
        if path is not None:
            check_writable(path, force)


def _vector(name: str) -> tuple[Path, Any]:
    from caa_local.core.locate import load_vector

    return load_vector(name)


def _layers(spec: str | None, vector: Any, where: Path, n_layer: int | None) -> list[int]:
    """--layers, or the vector's recommended layer; 'all' = every layer the vector holds.

    With ``n_layer`` None (before the model loads) only the syntax and the default are checked.
    """
    from caa_local.core.layers import parse_layer_spec

    if spec is None:
        layer = vector.recommended_layer()
        if layer is None:
            raise CaaError(
                f"{where}: the vector records no recommended layer (caa.recommended_layer); "
                "pass --layers, e.g. --layers 15 or --layers all"
            )
        return [layer]
    if spec.strip().lower() == "all":
        return [layer for layer in vector.layers if n_layer is None or layer < n_layer]
    return parse_layer_spec(spec, n_layer)


def _table(result: Any) -> str:
    mults = result.multipliers
    head = "layer " + " ".join(f"{m:>+7g}" for m in mults) + "   slope  anti"
    lines = ["p(match)", head]
    slopes, anti = result.steerability(), result.anti_steerable()
    for i, layer in enumerate(result.layers):
        cells = " ".join(f"{v:7.3f}" for v in result.p_match[i].mean(axis=-1))
        slope = "   n/a" if slopes[layer] is None else f"{slopes[layer]:+6.2f}"
        frac = "  n/a" if anti[layer] is None else f"{anti[layer]:5.2f}"
        lines.append(f"{layer:>5} {cells}  {slope} {frac}")
    lines += ["option mass p(match) + p(not match)", "layer " + " ".join(f"{m:>+7g}" for m in mults)]
    for i, layer in enumerate(result.layers):
        lines.append(f"{layer:>5} " + " ".join(f"{v:7.3f}" for v in result.option_mass[i].mean(axis=-1)))
    return "\n".join(lines)


@eval_group.command(name="ab")
@click.option("vector_name", "--vector", "-v", required=True, metavar="NAME|FILE", help="Vector to evaluate.")
@click.option("dataset", "--dataset", "-d", required=True, metavar="BEHAVIOR|FILE.json",
              help="A/B questions: a packaged behavior or a file in the paper's format.")
@click.option("layer_spec", "--layers", default=None, metavar="SPEC",
              help="Layers to sweep, e.g. 13, 10-15, all (default: the vector's recommended layer).")
@click.option("multipliers", "--multipliers", default=PAPER_MULTIPLIERS, show_default=True, metavar="LIST",
              help="Comma-separated multipliers.")
@model_options
@click.option("backend", "--backend", type=click.Choice(["native", "torch"]), default="native",
              show_default=True, help="llama.cpp (fast) or transformers hooks (the reference; small sets).")
@click.option("system", "--system", default=None, metavar="TEXT", help="System prompt text for every question.")
@click.option("positions", "--positions", type=click.Choice(["response", "all"]), default="response",
              show_default=True, help="Steer from the end of the instruction (CAA) or every token.")
@click.option("part", "--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Part of the dataset (the seeded split the extraction used).")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use the first N questions.")
@click.option("json_path", "--json", type=OUT, default=None, help="Write results as JSON.")
@click.option("plot_path", "--plot", type=OUT, default=None, help="Write a PNG of p(match) vs multiplier.")
@click.option("force", "--force", is_flag=True, help="Overwrite outputs; allow a vector for another architecture.")
def eval_ab(vector_name: str, dataset: str, layer_spec: str | None, multipliers: str, model_path: Path | None,
            n_ctx: int, n_threads: int, n_gpu_layers: int, backend: str, system: str | None, positions: str,
            part: str, limit: int | None, json_path: Path | None, plot_path: Path | None, force: bool) -> None:
    """A/B p(answer matching behavior) under steering, per layer and multiplier.

    \b
    Example:
        caa-local eval ab --vector sycophancy --dataset sycophancy --layers all --multipliers -1,0,1
    """
    from caa_local.core.datasets import load_ab, split
    from caa_local.eval.ab import ab_sweep, ab_sweep_torch
    from caa_local.core.parsing import parse_multipliers

    mults = parse_multipliers(multipliers)
    warn_multipliers(mults)
    _outputs(force, json_path, plot_path)
    vector_path, vector = _vector(vector_name)
    _layers(layer_spec, vector, vector_path, None)
    data = load_ab(dataset)
    items = split(data.items, part)[: limit or None]
    if not items:
        raise CaaError(f"{data.path}: no questions in the {part!r} part")
    start = time.perf_counter()
    with progress_bar(len(items), "A/B", "question") as update:
        if backend == "torch":
            from caa_local.torch.hf import chat_template_of, load_hf

            model, tokenizer, info = load_hf(model_path)
            layers = _layers(layer_spec, vector, vector_path, info.n_layer)
            result = ab_sweep_torch(model, tokenizer, chat_template_of(tokenizer), vector, items, layers,
                                    mults, system, positions, update)
            model_name = info.name
        else:
            engine = open_engine(model_path, n_ctx, n_threads, n_gpu_layers)
            layers = _layers(layer_spec, vector, vector_path, engine.n_layer)
            result = ab_sweep(engine, vector, items, layers, mults, system, update, force, positions)
            model_name = engine.model_path.name
    result.info.update(model=model_name, vector=str(vector_path), dataset=data.name,
                       dataset_sha256=data.sha256, split=part, seconds=round(time.perf_counter() - start, 2))
    click.echo(f"{data.name} ({part}, n={result.n}), {vector_path.name}, {backend}, "
               f"{result.info['seconds']:.1f} s")
    click.echo(_table(result))
    if json_path:
        from caa_local.core.atomic import write_json

        write_json(json_path, result.to_json(), force)
    if plot_path:
        from caa_local.eval.plots import p_match_vs_layer, p_match_vs_multiplier

        if len(result.layers) > 3 and len(result.multipliers) <= 3:
            p_match_vs_layer(result, plot_path, force=force)
        else:
            p_match_vs_multiplier(result, plot_path, force=force)


def _prompts(dataset: str | None, prompts_file: Path | None) -> tuple[str, list[str]]:
    from caa_local.core.datasets import load_open_ended

    if prompts_file is not None:
        if prompts_file.suffix == ".json":
            return prompts_file.stem, load_open_ended(prompts_file)
        try:
            lines = prompts_file.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise CaaError(f"{prompts_file}: cannot read: {err.strerror}") from None
        return prompts_file.stem, [line.strip() for line in lines if line.strip()]
    if dataset is None:
        raise CaaError("give --dataset BEHAVIOR or --prompts FILE")
    return dataset, load_open_ended(dataset)


@eval_group.command(name="open-ended")
@click.option("vector_name", "--vector", "-v", required=True, metavar="NAME|FILE", help="Vector to evaluate.")
@click.option("dataset", "--dataset", "-d", default=None, metavar="BEHAVIOR",
              help="Packaged behavior whose open-ended prompts to answer.")
@click.option("prompts_file", "--prompts", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Prompts: a .json list of {question} or a text file with one per line.")
@click.option("layer_spec", "--layers", default=None, metavar="SPEC",
              help="Layers, e.g. 13 or 12,15 (default: the vector's recommended layer).")
@click.option("multipliers", "--multipliers", default=OPEN_ENDED_MULTIPLIERS, show_default=True,
              metavar="LIST", help="Comma-separated multipliers.")
@click.option("metrics", "--metric", multiple=True, metavar="NAME",
              help="Judge-free metric (sentiment, formality, enthusiasm, length, ...); repeatable.")
@click.option("behavior", "--behavior", default=None, help="Rubric for the judge (default: the dataset's).")
@click.option("judge_model", "--judge-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GGUF model that scores each answer 0-10 with the behavior's rubric.")
@click.option("max_tokens", "--max-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Most tokens per answer.")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@click.option("seed", "--seed", type=int, default=0, show_default=True, help="Seed (answers are greedy).")
@click.option("perplexity", "--perplexity/--no-perplexity", default=True, show_default=True,
              help="Score each answer's perplexity under the unsteered model (fluency guard).")
@model_options
@click.option("out_path", "--out", type=OUT, default=None, help="Write one JSON line per answer.")
@click.option("export_path", "--export", type=OUT, default=None,
              help="Write JSONL for an external judge (answers with rubric and judge prompt).")
@click.option("force", "--force", is_flag=True, help="Overwrite outputs; allow a vector for another architecture.")
def eval_open_ended(vector_name: str, dataset: str | None, prompts_file: Path | None, layer_spec: str | None,
                    multipliers: str, metrics: tuple[str, ...], behavior: str | None, judge_model: Path | None,
                    max_tokens: int, limit: int | None, seed: int, perplexity: bool, model_path: Path | None,
                    n_ctx: int, n_threads: int, n_gpu_layers: int, out_path: Path | None,
                    export_path: Path | None, force: bool) -> None:
    """Greedy answers under steering, scored by judge-free metrics and optionally a judge model.

    \b
    Example:
        caa-local eval open-ended --vector sentiment --dataset sentiment --multipliers -4,0,4 --limit 10
    """
    from caa_local.eval.metrics import METRICS, perplexity as ppl, summarize
    from caa_local.eval.open_ended import open_ended
    from caa_local.eval.judge import RUBRICS, export_rows, judge, judge_summary
    from caa_local.core.parsing import parse_multipliers
    from caa_local.core.templates import user_turn

    mults = parse_multipliers(multipliers)
    warn_multipliers(mults)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise CaaError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    _outputs(force, out_path, export_path)
    vector_path, vector = _vector(vector_name)
    _layers(layer_spec, vector, vector_path, None)
    name, prompts = _prompts(dataset, prompts_file)
    prompts = prompts[: limit or None]
    behavior = behavior or (name if name in RUBRICS else vector.metadata.get("behavior") or None)
    if (judge_model or export_path) and behavior not in RUBRICS:
        raise CaaError(f"no judge rubric for {behavior!r}: pass --behavior (one of {', '.join(RUBRICS)})")
    names = list(metrics) or [DEMO_METRIC.get(str(behavior), "length")]
    engine = open_engine(model_path, n_ctx, n_threads, n_gpu_layers)
    max_tokens = clamp_max_tokens(max_tokens, engine)
    layers = _layers(layer_spec, vector, vector_path, engine.n_layer)
    rows: list[dict[str, Any]] = []
    with progress_bar(len(prompts) * len(mults) * len(layers), "generate", "answer") as update:
        for layer in layers:
            rows += open_ended(engine, vector, layer, mults, prompts, max_tokens, seed, update, force)
    for row in rows:
        row.update({m: METRICS[m](row["answer"]) for m in dict.fromkeys([*names, "distinct_2", "repetition"])})
    if perplexity:
        values = ppl(engine, [user_turn(r["prompt"]) for r in rows], [r["answer"] for r in rows])
        for row, value in zip(rows, values):
            row["perplexity"] = value
    if judge_model:
        judge_engine = open_engine(judge_model, n_ctx, n_threads, n_gpu_layers)
        with progress_bar(len(rows), "judge", "answer") as update:
            rows = judge(judge_engine, rows, str(behavior), update)
    for layer in layers:
        part = [r for r in rows if r["layer"] == layer]
        click.echo(f"layer {layer}: {len(prompts)} prompts from {name}, {vector_path.name}")
        scores = {s["multiplier"]: s for s in judge_summary(part)} if judge_model else {}
        for s in summarize(part, names):
            cells = "  ".join(f"{m} {s[m]:.3f}" for m in names)
            line = (f"  x{s['multiplier']:+g}: {cells}  | distinct-2 {s['distinct_2']:.2f}  "
                    f"rep-4 {s['repetition']:.2f}  degenerate {s['degenerate']:.0%}")
            if "perplexity" in s:
                line += f"  ppl {s['perplexity']:.1f}"
            if s["multiplier"] in scores:
                j = scores[s["multiplier"]]
                mean = "n/a" if j["score_mean"] is None else f"{j['score_mean']:.2f}±{j['score_std']:.2f}"
                line += f"  | judge {mean} ({j['unparseable']} unparseable)"
            click.echo(line)
    from caa_local.core.atomic import write_jsonl

    if out_path:
        write_jsonl(out_path, rows, force)
    if export_path:
        write_jsonl(export_path, export_rows(rows, str(behavior)), force)


def _capability(name: str) -> click.Command:
    title = "MMLU (570 questions)" if name == "mmlu" else "TruthfulQA (817 questions)"
    help_text = (f"p(correct answer) on {title} under steering, as A/B questions.\n\n"
                 f"\b\nExample:\n    caa-local eval {name} --vector sycophancy --limit 100")

    @click.command(name=name, help=help_text)
    @click.option("vector_name", "--vector", "-v", required=True, metavar="NAME|FILE", help="Vector to steer with.")
    @click.option("layer", "--layer", type=int, default=None, help="Layer (default: the vector's recommended one).")
    @click.option("multipliers", "--multipliers", default=CAPABILITY_MULTIPLIERS, show_default=True,
                  metavar="LIST", help="Comma-separated multipliers.")
    @click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use the first N questions.")
    @model_options
    @click.option("json_path", "--json", type=OUT, default=None, help="Write results as JSON.")
    @click.option("force", "--force", is_flag=True, help="Overwrite outputs; allow a vector for another architecture.")
    def command(vector_name: str, layer: int | None, multipliers: str, limit: int | None,
                model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int,
                json_path: Path | None, force: bool) -> None:
        from caa_local.core.datasets import load_capability
        from caa_local.eval.ab import capability_eval
        from caa_local.core.parsing import parse_multipliers

        mults = parse_multipliers(multipliers)
        warn_multipliers(mults)
        _outputs(force, json_path)
        vector_path, vector = _vector(vector_name)
        spec = None if layer is None else str(layer)
        _layers(spec, vector, vector_path, None)
        n = len(load_capability(name)[: limit or None])
        engine = open_engine(model_path, n_ctx, n_threads, n_gpu_layers)
        chosen = _layers(spec, vector, vector_path, engine.n_layer)[0]
        with progress_bar(n, name, "question") as update:
            rows = capability_eval(engine, name, vector, chosen, mults, limit, update, force)
        click.echo(f"{name} (n={n}), {vector_path.name} @ layer {chosen}")
        for row in rows:
            click.echo(f"  x{row['multiplier']:+g}: p(correct) {row['p_correct']:.3f}  "
                       f"option mass {row['option_mass']:.3f}")
        if json_path:
            from caa_local.core.atomic import write_json

            write_json(json_path, {"model": engine.model_path.name, "vector": str(vector_path),
                                   "dataset": name, "layer": chosen, "results": rows}, force)

    return command


eval_group.add_command(_capability("mmlu"))
eval_group.add_command(_capability("truthfulqa"))



@eval_group.command(name="report")
@click.option("out_dir", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("report"),
              show_default=True, help="Directory for README.md, JSON results and PNGs.")
@click.option("vectors_dir", "--vectors", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Directory of .gguf vectors (default: the shipped vectors).")
@click.option("part", "--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Part of each behavior's dataset.")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use the first N questions.")
@model_options
@click.option("force", "--force", is_flag=True, help="Overwrite the report.")
def eval_report(out_dir: Path, vectors_dir: Path | None, part: str, limit: int | None, model_path: Path | None,
                n_ctx: int, n_threads: int, n_gpu_layers: int, force: bool) -> None:
    """The paper's A/B evaluation of every vector: layer sweep at -1/0/+1, then -2..2.

    \b
    Example:
        caa-local eval report --out report --force
    """
    from caa_local.core.atomic import check_writable
    from caa_local.core.locate import shipped_vectors_dir
    from caa_local.eval.report import make_report

    check_writable(out_dir / "README.md", force)
    engine = open_engine(model_path, n_ctx, n_threads, n_gpu_layers)
    readme = make_report(out_dir, vectors_dir or shipped_vectors_dir(), part, limit, engine, force)
    click.echo(f"wrote {readme}")
