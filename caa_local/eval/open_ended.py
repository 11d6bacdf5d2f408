"""Open-ended evaluation: greedy answers to free-form prompts at every multiplier.

``open_ended`` answers; ``open_ended_eval`` runs ``eval open-ended`` whole: the answers scored
by the judge-free metrics (``caa_local.eval.metrics``), the unsteered model's perplexity and a
local judge model (``caa_local.eval.judge``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from caa_local.engine.batch import Batch, Conversation, sequences_within
from caa_local.core.errors import CaaError
from caa_local.core.layers import check_vector_layers
from caa_local.core.steering import check_multipliers
from caa_local.core.templates import user_turn
from caa_local.core.vector import ControlVector
from caa_local.engine.engine import Engine, Sampling
from caa_local.engine.scoring import perplexity
from caa_local.eval.formats import PROTOCOLS, default_protocol
from caa_local.eval.judge import RUBRICS, export_rows, judge, judge_summary
from caa_local.eval.metrics import FLUENCY, METRICS, summarize

# The metric shown by default for the demo behaviors (the others: answer length).
DEMO_METRIC = {"sentiment": "sentiment", "formality": "formality", "enthusiasm": "enthusiasm"}

Progress = Callable[[int], None]
BATCH_SEQUENCES = 8  # sequences decoded together: past about 8, 2-4 cores gain little more


def open_ended(
    engine: Engine,
    vector: ControlVector,
    layers: Sequence[int],
    multipliers: Sequence[float],
    prompts: Sequence[str],
    max_tokens: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
    force: bool = False,
    repeat_penalty: float = 1.1,
    batched: bool = True,
) -> list[dict[str, Any]]:
    """Greedy answers to every prompt at every (layer, multiplier), one row each, layer by layer.
    ``batched``: all of them decode together in one ``Batch`` (a steering per sequence), else one
    at a time."""
    unit = engine.make_term("eval", vector, 1.0, any_arch=force)  # the vector's one validation
    check_vector_layers(list(layers), vector.layers, engine.n_layer)
    multipliers = check_multipliers(multipliers)
    if not prompts:
        raise CaaError("no prompts to answer")
    cells = [(unit.at(layer=layer, scale=mult), mult) for layer in layers for mult in multipliers]
    # Greedy as in the paper, with a mild repetition penalty: small models loop otherwise.
    sampling = Sampling(temperature=0.0, seed=seed, max_tokens=max_tokens, repeat_penalty=repeat_penalty)
    rows: list[dict[str, Any]] = []
    if batched:
        rendered = [engine.prompt(user_turn(prompt)) for prompt in prompts]
        items = [Conversation(tokens, steer_from, (term,) if mult != 0.0 else (), sampling)
                 for term, mult in cells for tokens, steer_from in rendered]
        n_ctx = min(max(len(item.tokens) for item in items) + max_tokens + 1, engine.n_ctx)
        batch = Batch(engine.model, n_seq=sequences_within(engine.model, min(len(items), BATCH_SEQUENCES), n_ctx),
                      n_ctx=n_ctx, n_threads=engine.n_threads)
        answers = iter(batch.run(items))
    for term, mult in cells:
        with engine.steered([term] if mult != 0.0 and not batched else []):
            for prompt in prompts:
                result = next(answers) if batched else engine.generate(user_turn(prompt), sampling)
                rows.append({"prompt": prompt, "multiplier": mult, "layer": term.layers[0], "answer": result.text})
                if progress:
                    progress(1)
    return rows


# -- the whole evaluation: answers, metrics, perplexity, judge ------------------------------------
@dataclass(frozen=True)
class OpenEndedPlan:
    """What ``eval open-ended`` runs: prompts, the metrics and rubric that score the answers,
    and the generation protocol (``plan_open_ended`` fills the defaults)."""

    source: str  # where the prompts came from: a behavior or a file's stem
    prompts: tuple[str, ...]
    metrics: tuple[str, ...]  # judge-free behavior metrics shown in the summary
    behavior: str | None  # the judge's rubric
    max_tokens: int
    repeat_penalty: float
    seed: int = 0
    perplexity: bool = True
    rubric_set: str = "paper"


def plan_open_ended(source: str, prompts: Sequence[str], vector: ControlVector, metrics: Sequence[str] = (),
                    behavior: str | None = None, protocol: str | None = None, max_tokens: int | None = None,
                    repeat_penalty: float | None = None, seed: int = 0, perplexity: bool = True,
                    rubric_set: str = "paper", needs_rubric: bool = False) -> OpenEndedPlan:
    """The plan with every default chosen: the rubric from the prompts' behavior or the
    vector's, a metric for the demo behaviors (else length), the paper's protocol for its
    behaviors (else the demo's). ``needs_rubric``: a judge or an export will use it."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise CaaError(f"unknown metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    behavior = behavior or (source if source in RUBRICS else vector.metadata.get("behavior") or None)
    if needs_rubric and behavior not in RUBRICS:
        raise CaaError(f"no judge rubric for {behavior!r}: pass --behavior (one of {', '.join(RUBRICS)})")
    chosen = PROTOCOLS[protocol or default_protocol(behavior)]
    return OpenEndedPlan(
        source, tuple(prompts), tuple(metrics) or (DEMO_METRIC.get(str(behavior), "length"),), behavior,
        max_tokens or chosen.max_tokens, chosen.repeat_penalty if repeat_penalty is None else repeat_penalty,
        seed, perplexity, rubric_set,
    )


ProgressBar = Callable[[int, str, str], AbstractContextManager[Progress]]  # (total, what, unit)


@dataclass
class OpenEndedResult:
    plan: OpenEndedPlan
    layers: list[int]
    rows: list[dict[str, Any]]
    judged: bool

    def summary(self, vector_name: str) -> list[str]:
        """Per layer a header, then per multiplier the metrics, fluency and judge scores."""
        plan, lines = self.plan, []
        for layer in self.layers:
            part = [r for r in self.rows if r["layer"] == layer]
            lines.append(f"layer {layer}: {len(plan.prompts)} prompts from {plan.source}, {vector_name}, "
                         f"{plan.max_tokens} tokens, repeat penalty {plan.repeat_penalty:g}")
            scores = {s["multiplier"]: s for s in judge_summary(part)} if self.judged else {}
            for s in summarize(part, plan.metrics):
                cells = "  ".join(f"{m} {s[m]:.3f}" for m in plan.metrics)
                line = (f"  x{s['multiplier']:+g}: {cells}  | distinct-2 {s['distinct_2']:.2f}  "
                        f"rep-4 {s['repetition']:.2f}  degenerate {s['degenerate']:.0%}")
                if "perplexity" in s:
                    line += f"  ppl {s['perplexity']:.1f}"
                if s["multiplier"] in scores:
                    j = scores[s["multiplier"]]
                    mean = "n/a" if j["score_mean"] is None else f"{j['score_mean']:.2f}±{j['score_std']:.2f}"
                    line += f"  | judge {mean} ({j['unparseable']} unparseable)"
                lines.append(line)
        return lines

    def export(self) -> list[dict[str, Any]]:
        """The rows for an external judge (rubric and judge prompt with each answer)."""
        return export_rows(self.rows, str(self.plan.behavior), self.plan.rubric_set)


def open_ended_eval(engine: Engine, vector: ControlVector, layers: Sequence[int], multipliers: Sequence[float],
                    plan: OpenEndedPlan, judge_engine: Engine | None = None, bar: ProgressBar | None = None,
                    force: bool = False) -> OpenEndedResult:
    """Greedy answers at every (layer, multiplier), each scored by the judge-free metrics, the
    unsteered model's perplexity (``plan.perplexity``) and the judge model (if given)."""
    bar = bar or (lambda _total, _what, _unit: nullcontext(None))
    multipliers = check_multipliers(multipliers)
    rows: list[dict[str, Any]] = []
    with bar(len(plan.prompts) * len(multipliers) * len(layers), "generate", "answer") as update:
        rows = open_ended(engine, vector, layers, multipliers, plan.prompts, plan.max_tokens, plan.seed,
                          update, force, plan.repeat_penalty)
    for row in rows:
        row.update({m: METRICS[m](row["answer"]) for m in dict.fromkeys([*plan.metrics, *FLUENCY])})
    if plan.perplexity:
        values = perplexity(engine, [user_turn(r["prompt"]) for r in rows], [r["answer"] for r in rows])
        for row, value in zip(rows, values):
            row["perplexity"] = value
    if judge_engine is not None:
        with bar(len(rows), "judge", "answer") as update:
            rows = judge(judge_engine, rows, str(plan.behavior), update, plan.rubric_set)
    return OpenEndedResult(plan, list(layers), rows, judge_engine is not None)
