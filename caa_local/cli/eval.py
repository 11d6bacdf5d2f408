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

from caa_local.cli import (any_arch_option, chat_template_option, clamp_max_tokens, model_options, open_engine, warn,
                           warn_multipliers)
from caa_local.core.errors import CaaError

OUT = click.Path(dir_okay=False, path_type=Path)
PAPER_MULTIPLIERS = "-1,-0.5,0,0.5,1"
OPEN_ENDED_MULTIPLIERS = "-2,-1.5,-1,0,1,1.5,2"
CAPABILITY_MULTIPLIERS = "-2,-1,0,1,2"


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


def _sweep_inputs(multipliers: str, vector_name: str, force: bool, *outputs: Path | None) -> tuple[list[float], Path, Any]:
    """(multipliers, vector path, vector) of a steered evaluation, every output checked writable."""
    from caa_local.core.locate import load_vector
    from caa_local.core.parsing import parse_multipliers

    mults = parse_multipliers(multipliers)
    warn_multipliers(mults)
    _outputs(force, *outputs)
    return (mults, *load_vector(vector_name))


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


def template_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--format chat|base and --chat-template NAME|FILE, for every command that builds prompts."""
    func = chat_template_option(func)
    return click.option("fmt", "--format", type=click.Choice(["chat", "base"]), default="chat", show_default=True,
                        help="chat: the model's template; base: the paper's 'Input: ...\\nResponse: (A' "
                             "for base models.")(func)


def _engine(model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int, chat_template: str | None,
            fmt: str) -> Any:
    return open_engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template, fmt)


def _behavior_of(dataset: str | None, vector: Any, where: Path) -> str:
    """--dataset, else the behavior the vector records."""
    if dataset:
        return dataset
    behavior = vector.metadata.get("behavior")
    if not behavior:
        raise CaaError(f"{where}: the vector records no behavior; pass --dataset BEHAVIOR|FILE.json")
    return str(behavior)


@eval_group.command(name="ab")
@click.option("vector_name", "--vector", "-v", required=True, metavar="NAME|FILE", help="Vector to evaluate.")
@click.option("dataset", "--dataset", "-d", default=None, metavar="BEHAVIOR|FILE.json",
              help="A/B questions: a packaged behavior (its held-out test set) or a file in the paper's "
                   "format (evaluated whole). Default: the vector's behavior.")
@click.option("layer_spec", "--layers", default=None, metavar="SPEC",
              help="Layers to sweep, e.g. 13, 10-15, all (default: the vector's recommended layer).")
@click.option("from_layer", "--from-layer", type=int, default=None, metavar="L",
              help="Apply the vector's layer-L direction at every layer of --layers (the paper's transfer figure).")
@click.option("multipliers", "--multipliers", default=PAPER_MULTIPLIERS, show_default=True, metavar="LIST",
              help="Comma-separated multipliers.")
@model_options
@template_options
@click.option("backend", "--backend", type=click.Choice(["native", "torch"]), default="native",
              show_default=True, help="llama.cpp (fast) or transformers hooks (the reference; small sets).")
@click.option("system", "--system", default=None, metavar="pos|neg|TEXT",
              help="System prompt for every question: the paper's pos/neg prompt of the behavior, or text.")
@click.option("positions", "--positions", type=click.Choice(["response", "all"]), default="response",
              show_default=True, help="Steer from the end of the instruction (CAA) or every token.")
@click.option("part", "--split", type=click.Choice(["test", "val", "train", "all"]), default=None,
              help="Questions: test = the paper's held-out set (default for its behaviors); val/train = the "
                   "seeded split of generate_dataset.json (choose layers on val); all = the whole file "
                   "(default for a FILE).")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use the first N questions.")
@click.option("json_path", "--json", type=OUT, default=None, help="Write results as JSON.")
@click.option("plot_path", "--plot", type=OUT, default=None, help="Write a PNG of p(match) vs multiplier.")
@click.option("force", "--force", is_flag=True, help="Overwrite output files.")
@any_arch_option
def eval_ab(vector_name: str, dataset: str | None, layer_spec: str | None, from_layer: int | None, multipliers: str,
            model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int, chat_template: str | None,
            fmt: str, backend: str, system: str | None, positions: str, part: str | None, limit: int | None,
            json_path: Path | None, plot_path: Path | None, force: bool, any_arch: bool) -> None:
    """A/B p(answer matching behavior) under steering, per layer and multiplier.

    \b
    Example:
        caa-local eval ab --vector sycophancy --layers all --multipliers -1,0,1 --split val
        caa-local eval ab --vector sycophancy --system pos --multipliers -1,0,1
        caa-local eval ab --vector sycophancy --from-layer 13 --layers all --multipliers -1,1
    """
    from caa_local.core.datasets import eval_set
    from caa_local.eval.ab import ab_sweep, ab_sweep_torch
    from caa_local.eval.system_prompts import resolve_system

    mults, vector_path, vector = _sweep_inputs(multipliers, vector_name, force, json_path, plot_path)
    if from_layer is not None and layer_spec is None:
        raise CaaError("--from-layer needs --layers (the layers to apply it at, e.g. all)")
    if from_layer is None:
        _layers(layer_spec, vector, vector_path, None)
    data = eval_set(_behavior_of(dataset, vector, vector_path), part, limit)
    system_text = resolve_system(system, data.name)
    start = time.perf_counter()
    with progress_bar(data.n, "A/B", "question") as update:
        if backend == "torch":
            from caa_local.torch.hf import chat_template_of, load_hf

            model, tokenizer, info = load_hf(model_path)
            template = chat_template_of(tokenizer, chat_template, fmt, info.name)
            vector, layers = _sweep_vector(vector, layer_spec, from_layer, vector_path, info.n_layer)
            result = ab_sweep_torch(model, tokenizer, template, vector, data.items, layers,
                                    mults, system_text, positions, update)
            model_name = info.name
        else:
            engine = _engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template, fmt)
            vector, layers = _sweep_vector(vector, layer_spec, from_layer, vector_path, engine.n_layer)
            result = ab_sweep(engine, vector, data.items, layers, mults, system_text, update, any_arch, positions)
            model_name = engine.model_path.name
    result.info.update(model=model_name, vector=str(vector_path), **data.describe(), format=fmt,
                       system=system or "", from_layer=from_layer, seconds=round(time.perf_counter() - start, 2))
    transfer = f", layer-{from_layer} direction at every layer" if from_layer is not None else ""
    click.echo(f"{data.label()}, {vector_path.name}{transfer}, {backend}, {result.info['seconds']:.1f} s")
    if system:
        click.echo(f"system prompt ({system if system in ('pos', 'neg') else 'text'}): {system_text}")
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


def _sweep_vector(vector: Any, layer_spec: str | None, from_layer: int | None, where: Path,
                  n_layer: int) -> tuple[Any, list[int]]:
    """The vector to sweep and its layers: with --from-layer, one direction copied to every layer."""
    if from_layer is None:
        return vector, _layers(layer_spec, vector, where, n_layer)
    from caa_local.core.layers import check_steerable, parse_layer_spec, steerable_range
    from caa_local.eval.experiments import transfer_vector

    check_steerable(from_layer, n_layer, "--from-layer")
    spec = str(layer_spec)
    layers = list(steerable_range(n_layer)) if spec.strip().lower() == "all" else parse_layer_spec(spec, n_layer)
    return transfer_vector(vector, from_layer, layers), layers


@eval_group.command(name="system-prompts")
@click.option("vector_name", "--vector", "-v", required=True, metavar="NAME|FILE", help="Vector to evaluate.")
@click.option("dataset", "--dataset", "-d", default=None, metavar="BEHAVIOR",
              help="A paper behavior (its pos/neg system prompts and test set). Default: the vector's.")
@click.option("layer", "--layers", "--layer", type=int, default=None, metavar="LAYER",
              help="Layer (default: the vector's recommended one).")
@click.option("multipliers", "--multipliers", default="-1,0,1", show_default=True, metavar="LIST",
              help="Comma-separated multipliers.")
@click.option("part", "--split", type=click.Choice(["test", "val", "train"]), default=None,
              help="Questions (default: the paper's test set).")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use the first N questions.")
@model_options
@template_options
@click.option("json_path", "--json", type=OUT, default=None, help="Write the table as JSON.")
@click.option("force", "--force", is_flag=True, help="Overwrite output files.")
@any_arch_option
def eval_system_prompts(vector_name: str, dataset: str | None, layer: int | None, multipliers: str,
                        part: str | None, limit: int | None, model_path: Path | None, n_ctx: int, n_threads: int,
                        n_gpu_layers: int, chat_template: str | None, fmt: str, json_path: Path | None,
                        force: bool, any_arch: bool) -> None:
    """The paper's table: p(match) with no / the pos / the neg system prompt x multipliers.

    \b
    Example:
        caa-local eval system-prompts --vector sycophancy --multipliers -1,0,1
    """
    from caa_local.core.datasets import eval_set
    from caa_local.eval.system_prompts import system_prompt_table

    mults, vector_path, vector = _sweep_inputs(multipliers, vector_name, force, json_path)
    spec = None if layer is None else str(layer)
    _layers(spec, vector, vector_path, None)
    data = eval_set(_behavior_of(dataset, vector, vector_path), part, limit)
    engine = _engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template, fmt)
    chosen = _layers(spec, vector, vector_path, engine.n_layer)[0]
    with progress_bar(data.n * 3, "A/B", "question") as update:
        table = system_prompt_table(engine, vector, data.name, data.items, chosen, mults, update, any_arch)
    table.info.update(model=engine.model_path.name, vector=str(vector_path), **data.describe())
    click.echo(f"{data.label()}, {vector_path.name} @ layer {chosen}: p(match)")
    click.echo(table.table())
    if json_path:
        from caa_local.core.atomic import write_json

        write_json(json_path, table.to_json(), force)


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
@click.option("rubric_set", "--rubric", type=click.Choice(["paper", "caa-local"]), default="paper",
              show_default=True, help="Judge prompt: the paper's (system prompt + instruction) or our shorter one.")
@click.option("protocol", "--protocol", type=click.Choice(["paper", "demo"]), default=None,
              help="paper: greedy, 100 tokens, no repetition penalty (default for the paper's behaviors); "
                   "demo: 128 tokens, penalty 1.1 (default for the demo behaviors).")
@click.option("max_tokens", "--max-tokens", type=click.IntRange(min=1), default=None,
              help="Most tokens per answer (default: the protocol's).")
@click.option("repeat_penalty", "--repeat-penalty", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Repetition penalty (1 = none; default: the protocol's).")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None, help="Use the first N prompts.")
@click.option("seed", "--seed", type=int, default=0, show_default=True, help="Seed (answers are greedy).")
@click.option("perplexity", "--perplexity/--no-perplexity", default=True, show_default=True,
              help="Score each answer's perplexity under the unsteered model (fluency guard).")
@model_options
@template_options
@click.option("out_path", "--out", type=OUT, default=None, help="Write one JSON line per answer.")
@click.option("export_path", "--export", type=OUT, default=None,
              help="Write JSONL for an external judge (answers with rubric and judge prompt).")
@click.option("force", "--force", is_flag=True, help="Overwrite output files.")
@any_arch_option
def eval_open_ended(vector_name: str, dataset: str | None, prompts_file: Path | None, layer_spec: str | None,
                    multipliers: str, metrics: tuple[str, ...], behavior: str | None, judge_model: Path | None,
                    rubric_set: str, protocol: str | None, max_tokens: int | None, repeat_penalty: float | None,
                    limit: int | None, seed: int, perplexity: bool, model_path: Path | None,
                    n_ctx: int, n_threads: int, n_gpu_layers: int, chat_template: str | None, fmt: str,
                    out_path: Path | None, export_path: Path | None, force: bool, any_arch: bool) -> None:
    """Greedy answers under steering, scored by judge-free metrics and optionally a judge model.

    \b
    Example:
        caa-local eval open-ended --vector sentiment --dataset sentiment --multipliers -4,0,4 --limit 10
    """
    import dataclasses

    from caa_local.core.atomic import write_jsonl
    from caa_local.eval.open_ended import open_ended_eval, plan_open_ended

    mults, vector_path, vector = _sweep_inputs(multipliers, vector_name, force, out_path, export_path)
    _layers(layer_spec, vector, vector_path, None)
    name, prompts = _prompts(dataset, prompts_file)
    plan = plan_open_ended(name, prompts[: limit or None], vector, metrics, behavior, protocol, max_tokens,
                           repeat_penalty, seed, perplexity, rubric_set, bool(judge_model or export_path))
    engine = _engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template, fmt)
    plan = dataclasses.replace(plan, max_tokens=clamp_max_tokens(plan.max_tokens, engine))
    layers = _layers(layer_spec, vector, vector_path, engine.n_layer)
    judge_engine = open_engine(judge_model, n_ctx, n_threads, n_gpu_layers) if judge_model else None
    result = open_ended_eval(engine, vector, layers, mults, plan, judge_engine, progress_bar, any_arch)
    for line in result.summary(vector_path.name):
        click.echo(line)
    if out_path:
        write_jsonl(out_path, result.rows, force)
    if export_path:
        write_jsonl(export_path, result.export(), force)


def _capability(name: str) -> click.Command:
    title = "MMLU (570 questions)" if name == "mmlu" else "TruthfulQA (817 questions)"
    help_text = (f"p(correct answer) on {title} under steering, as A/B questions.\n\n"
                 f"\b\nExample:\n    caa-local eval {name} --vector sycophancy --limit 100")

    @click.command(name=name, help=help_text)
    @click.option("vector_name", "--vector", "-v", required=True, metavar="NAME|FILE", help="Vector to steer with.")
    @click.option("layer", "--layers", "--layer", type=int, default=None, metavar="LAYER",
                  help="Layer (default: the vector's recommended one).")
    @click.option("multipliers", "--multipliers", default=CAPABILITY_MULTIPLIERS, show_default=True,
                  metavar="LIST", help="Comma-separated multipliers.")
    @click.option("limit", "--limit", type=click.IntRange(min=1), default=None,
                  help="Use the first N questions (with --by-category: of every category).")
    @click.option("by_category", "--by-category", is_flag=True, help="p(correct) per category (the paper's tables).")
    @model_options
    @template_options
    @click.option("json_path", "--json", type=OUT, default=None, help="Write results as JSON.")
    @click.option("force", "--force", is_flag=True, help="Overwrite output files.")
    @any_arch_option
    def command(vector_name: str, layer: int | None, multipliers: str, limit: int | None, by_category: bool,
                model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int,
                chat_template: str | None, fmt: str, json_path: Path | None, force: bool, any_arch: bool) -> None:
        from caa_local.eval.capability import capability_eval, capability_items

        mults, vector_path, vector = _sweep_inputs(multipliers, vector_name, force, json_path)
        spec = None if layer is None else str(layer)
        _layers(spec, vector, vector_path, None)
        n = len(capability_items(name, limit, by_category))
        engine = _engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template, fmt)
        chosen = _layers(spec, vector, vector_path, engine.n_layer)[0]
        with progress_bar(n, name, "question") as update:
            result = capability_eval(engine, name, vector, chosen, mults, limit, update, any_arch, by_category)
        result.info.update(model=engine.model_path.name, vector=str(vector_path))
        if by_category:
            click.echo(f"{name} (n={result.n}, {len(result.categories)} categories), {vector_path.name} "
                       f"@ layer {chosen}: p(correct)")
            click.echo(result.table())
        else:
            click.echo(f"{name} (n={result.n}), {vector_path.name} @ layer {chosen}")
            for row in result.rows():
                click.echo(f"  x{row['multiplier']:+g}: p(correct) {row['p_correct']:.3f}  "
                           f"option mass {row['option_mass']:.3f}")
        if json_path:
            from caa_local.core.atomic import write_json

            write_json(json_path, result.to_json(), force)

    return command


eval_group.add_command(_capability("mmlu"))
eval_group.add_command(_capability("truthfulqa"))



@eval_group.command(name="report")
@click.option("out_dir", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("report"),
              show_default=True, help="Directory for README.md, JSON results and PNGs.")
@click.option("vectors_dir", "--vectors", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Directory of .gguf vectors (default: the shipped vectors).")
@click.option("paper", "--paper", is_flag=True,
              help="Run the whole paper: layer choice on val, test-set tables beside the paper's numbers, "
                   "system prompts, layer transfer, open-ended, MMLU/TruthfulQA per category, similarities.")
@click.option("extract_from", "--extract-from", default=None, metavar="HF_DIR|HUB_ID|FILE.gguf",
              help="With --paper: extract the vectors from this model first (torch) instead of --vectors.")
@click.option("base_vectors", "--base-vectors", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="With --paper: the base model's vectors, compared with and steering the chat model.")
@click.option("judge_model", "--judge-model", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --paper: GGUF judge for the open-ended answers (else they are exported for one).")
@click.option("behaviors", "--behaviors", default=None, metavar="LIST",
              help="With --paper: comma-separated paper behaviors (default: all seven).")
@click.option("part", "--split", type=click.Choice(["test", "val", "train", "all"]), default=None,
              help="Without --paper: questions per behavior (default: the test set where there is one).")
@click.option("limit", "--limit", type=click.IntRange(min=1), default=None,
              help="Use the first N questions (with --paper: of every set; N per category for MMLU/TruthfulQA).")
@click.option("open_ended_limit", "--open-ended-limit", type=click.IntRange(min=1), default=None,
              help="With --paper: open-ended prompts per behavior (default 10, or --limit).")
@click.option("capability_limit", "--capability-limit", type=click.IntRange(min=0), default=None,
              help="With --paper: MMLU/TruthfulQA questions per category (default: --limit, else all; 0 skips).")
@click.option("train_limit", "--train-limit", type=click.IntRange(min=2), default=None,
              help="With --extract-from: extraction pairs per behavior (default: the whole train split).")
@model_options
@template_options
@click.option("force", "--force", is_flag=True, help="Overwrite the report.")
def eval_report(out_dir: Path, vectors_dir: Path | None, paper: bool, extract_from: str | None,
                base_vectors: Path | None, judge_model: Path | None, behaviors: str | None, part: str | None,
                limit: int | None, open_ended_limit: int | None, capability_limit: int | None,
                train_limit: int | None,
                model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int, chat_template: str | None,
                fmt: str, force: bool) -> None:
    """The paper's evaluations of a model's vectors, as a Markdown report with figures.

    \b
    Example:
        caa-local eval report --out report --force
        caa-local eval report --paper --model llama-2-7b-chat.Q4_K_M.gguf \\
            --extract-from meta-llama/Llama-2-7b-chat-hf --out paper/
        caa-local eval report --paper --limit 5 --out paper-small/
    """
    from caa_local.core.atomic import check_writable
    from caa_local.core.locate import shipped_vectors_dir

    check_writable(out_dir / "README.md", force)
    if not paper:
        from caa_local.eval.report import make_report

        if extract_from or base_vectors or judge_model or behaviors:
            raise CaaError("--extract-from, --base-vectors, --judge-model and --behaviors need --paper")
        engine = _engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template, fmt)
        readme = make_report(out_dir, vectors_dir or shipped_vectors_dir(), part, limit, engine, force)
        click.echo(f"wrote {readme}")
        return
    from caa_local.eval.paper import PaperConfig, PaperInputs, paper_report

    if extract_from and vectors_dir:
        raise CaaError("give --vectors DIR or --extract-from MODEL, not both")
    config = PaperConfig(
        behaviors=tuple(b.strip() for b in behaviors.split(",") if b.strip()) if behaviors else PaperConfig.behaviors,
        limit=limit, val_limit=limit, train_limit=train_limit,
        capability_limit=limit if capability_limit is None else capability_limit or None,
        capability_behaviors=() if capability_limit == 0 else None,
        open_ended_limit=open_ended_limit or limit or 10,
    )
    start = time.perf_counter()
    engine = _engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template, fmt)
    judge_engine = open_engine(judge_model, n_ctx, n_threads, n_gpu_layers) if judge_model else None
    hf = None
    if extract_from:
        from caa_local.eval.paper import extract_vectors
        from caa_local.torch.hf import chat_template_of, load_hf

        model, tokenizer, info = load_hf(extract_from)
        template = chat_template_of(tokenizer, chat_template, fmt, info.name)
        vectors = extract_vectors(model, tokenizer, template, info, config.behaviors, train_limit, out_dir,
                                  force, warn)
        hf, source = (model, tokenizer, template), f"extracted from `{info.name}` (`vectors/`)"
    else:
        folder = vectors_dir or shipped_vectors_dir()
        vectors, source = _vectors_in(folder, config.behaviors), f"from `{folder}`"
    base = _vectors_in(base_vectors, config.behaviors, required=False) if base_vectors else {}
    inputs = PaperInputs(engine, vectors, judge_engine, base, hf, source)
    readme = paper_report(out_dir, inputs, config, force, warn)
    click.echo(f"wrote {readme} ({time.perf_counter() - start:.0f} s)")


def _vectors_in(folder: Path, behaviors: tuple[str, ...], required: bool = True) -> dict[str, Any]:
    """<behavior>.gguf of every behavior in ``folder`` (all of them when ``required``)."""
    from caa_local.core.vector import ControlVector

    found = {b: folder / f"{b}.gguf" for b in behaviors if (folder / f"{b}.gguf").is_file()}
    missing = [b for b in behaviors if b not in found]
    if required and missing:
        raise CaaError(f"{folder}: no {missing[0]}.gguf (the paper report needs one vector per behavior)")
    return {b: ControlVector.load(path) for b, path in found.items()}
