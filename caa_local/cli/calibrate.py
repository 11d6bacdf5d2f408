"""`caa-local calibrate`: choose a vector's layer and strength on a model and store them in the file."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from caa_local.cli import chat_template_option, model_options, open_engine, warn
from caa_local.cli.shared import target_path

METRICS = ("p_match", "sentiment", "formality", "enthusiasm", "length")


def calibration_settings(quick: bool, **options: Any) -> Any:
    """Settings from the options given (None: the default, or the --quick one)."""
    from caa_local.eval.calibrate import QUICK, Settings

    given = {k: v for k, v in options.items() if v is not None}
    return Settings(**{**(QUICK if quick else {}), **given})


def run_calibration(vector_path: Path, out: Path | None, force: bool, engine: Any, settings: Any, data: Any,
                    json_path: Path | None = None, any_arch: bool = False) -> dict[str, Any]:
    """Calibrate the vector file, write it (atomically) and print the card; the summary back."""
    from caa_local.core.atomic import write_json
    from caa_local.core.vector import ControlVector
    from caa_local.eval.calibrate import calibrate, calibrated, card_lines

    vector = ControlVector.load(vector_path)
    target = target_path(vector_path, out, force, vector.calibration() is not None)
    summary = calibrate(engine, vector, data, settings, log=lambda m: warn(f"[calibrate] {m}"), any_arch=any_arch)
    calibrated(vector, summary).save(target, force=True)
    if json_path is not None:
        write_json(json_path, summary, force=force)
    for line in card_lines(summary):
        click.echo(line)
    click.echo(f"wrote {target} (recommended_layer {summary['layer']}, "
               f"recommended_multiplier {summary['recommended_multiplier']:g}; {summary['seconds']:.0f} s)")
    return summary


@click.command(name="calibrate")
@click.argument("vector_ref", metavar="VECTOR|BEHAVIOR")
@model_options
@chat_template_option
@click.option("dataset", "--dataset", default=None,
              help="A/B data: a behavior name or FILE.json (default: the vector's behavior).")
@click.option("layers", "--layers", default=None, metavar="SPEC",
              help="Candidate layers, e.g. 10-20 (default: every layer the vector holds).")
@click.option("multipliers", "--multipliers", default=None, metavar="LIST",
              help="Strengths to try, e.g. 0.5,1,2,-0.5,-1,-2 (default: +-0.5 .. +-8).")
@click.option("metric", "--metric", type=click.Choice(METRICS), default=None,
              help="What the layer and curve measure (default: the demo behaviors' own metric, else p_match).")
@click.option("conversations", "--conversations", type=click.IntRange(min=1), default=None,
              help="Held-out conversations per multiplier for the guard (default 12).")
@click.option("turns", "--turns", type=click.IntRange(min=1), default=None, help="Turns per conversation (default 3).")
@click.option("max_tokens", "--max-tokens", type=click.IntRange(min=1), default=None,
              help="Most tokens per answer in the guard's conversations (default 96).")
@click.option("val_limit", "--val-limit", type=click.IntRange(min=1), default=None,
              help="Validation questions for the layer sweep (default 40).")
@click.option("mmlu_limit", "--limit", type=click.IntRange(min=0), default=None,
              help="MMLU questions for the card's capability line (default 40; 0: none).")
@click.option("seed", "--seed", type=click.IntRange(0, 2**32 - 1), default=None, help="Sampling seed (default 0).")
@click.option("quick", "--quick", is_flag=True, help="Small data everywhere: a rough calibration in a few minutes.")
@click.option("strategy", "--strategy", type=click.Choice(("search", "walk")), default=None,
              help="How the strength is found: search (default: coarse steps then bisection on a third of the "
                   "conversations, the pick on all of them, batched) or walk (every multiplier outwards, one conversation at a time: the slow reference).")
@click.option("out", "--out", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the calibrated vector here (default: update VECTOR's own file).")
@click.option("json_path", "--json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the calibration summary and card as JSON.")
@click.option("--force", is_flag=True, help="Replace an earlier calibration or an existing --out/--json file.")
def calibrate(vector_ref: str, model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int,
              chat_template: str | None, dataset: str | None, layers: str | None, multipliers: str | None, metric: str | None,
              conversations: int | None, turns: int | None, max_tokens: int | None, val_limit: int | None,
              mmlu_limit: int | None, seed: int | None, quick: bool, strategy: str | None, out: Path | None,
              json_path: Path | None, force: bool) -> None:
    """Find VECTOR's layer and the strongest multipliers that keep a chat coherent; store them in the file.

    For a condition vector (`caa-local condition extract`): the layer, threshold and comparison
    with the best F1 on its held-out prompts (--dataset POS,NEG overrides the recorded data).

    The layer comes from the A/B validation split (or the judge-free metric of the demo
    behaviors); the strength from conversations answered with the chat's sampling, guarded
    by perplexity under the unsteered model, broken turns and repetition. Prints a
    reliability card: p(match) on the test split, anti-steerable share, system-prompt
    baseline and MMLU change.

    \b
    Example:
      caa-local calibrate my_vector.gguf --dataset sycophancy
      caa-local calibrate sentiment --quick --out /tmp/sentiment.gguf
    """
    from caa_local.core.atomic import check_writable
    from caa_local.core.layers import parse_layer_spec
    from caa_local.core.locate import resolve_vector
    from caa_local.core.parsing import parse_multipliers
    from caa_local.core.vector import ControlVector
    from caa_local.eval.calibrate import load_data

    vector_path = resolve_vector(vector_ref)
    vector = ControlVector.load(vector_path)
    if vector.metadata.get("kind") == "condition":  # CAST's grid search instead (cli/condition.py)
        from caa_local.cli.condition import calibrate_condition

        calibrate_condition(vector_path, out, force, open_engine(model_path, 512, n_threads, n_gpu_layers),
                            dataset=tuple(dataset.split(",")) if dataset else None, json_path=json_path)
        return
    target_path(vector_path, out, force, vector.calibration() is not None)
    if json_path is not None:
        check_writable(json_path, force)
    behavior = vector.metadata.get("behavior", "")
    if metric is None:
        metric = behavior if behavior in ("sentiment", "formality", "enthusiasm") else "p_match"
    mults = None
    if multipliers is not None:
        mults = tuple(m for m in parse_multipliers(multipliers) if m != 0.0)
    settings = calibration_settings(quick, metric=metric, multipliers=mults,
                                    layers=parse_layer_spec(layers) if layers else None,
                                    conversations=conversations, turns=turns, max_tokens=max_tokens,
                                    val_limit=val_limit, mmlu_limit=mmlu_limit, seed=seed, strategy=strategy)
    data = load_data(behavior, dataset, settings)
    engine = open_engine(model_path, n_ctx, n_threads, n_gpu_layers, chat_template)
    if settings.layers:
        settings = dataclasses.replace(settings, layers=parse_layer_spec(layers, engine.n_layer))
    run_calibration(vector_path, out, force, engine, settings, data, json_path)
