"""A/B sweeps, capability and open-ended evaluation, the judge's parsing and the plots, on the
real default model (few questions: the CPU is shared)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from caa_local.eval import analyze
from caa_local.eval import plots
from caa_local.core.datasets import ABItem, load_ab, split
from caa_local.engine.engine import Engine
from caa_local.engine.model import Model
from caa_local.core.errors import CaaError
from caa_local.eval.ab import SweepResult, ab_sweep
from caa_local.eval.capability import capability_eval
from caa_local.eval.open_ended import open_ended
from caa_local.eval.judge import RUBRICS, export_rows, judge, judge_summary, parse_score
from caa_local.engine import scoring
from caa_local.engine.scoring import choices_from_items, score_ab, score_ab_naive
from caa_local.core.parsing import parse_multipliers
from caa_local.core.steering import Steering
from conftest import is_png, random_vector

pytestmark = pytest.mark.slow

# One thread: on a CPU shared with other jobs, 2 threads on 2 cores made this file 3-4x slower
# (ggml's threads spin on barriers, so one descheduled thread stalls every graph node).
# CAA_TEST_THREADS=2 on an idle machine.
THREADS = int(os.environ.get("CAA_TEST_THREADS", "1"))




@pytest.fixture(scope="module")
def engine(model: Model) -> Engine:
    return model.context(n_ctx=1024, n_threads=THREADS)


@pytest.fixture(scope="module")
def items() -> list[ABItem]:
    return split(load_ab("sentiment").items, "val")[:6]


@pytest.fixture(scope="module")
def sweep(engine: Engine, items: list[ABItem]) -> SweepResult:
    vector = random_vector(engine.n_embd, [8, 15], norm=60.0)
    return ab_sweep(engine, vector, items, [8, 15], [-1, 0, 1])


def test_rows_and_shared_baseline(sweep: SweepResult) -> None:
    rows = sweep.rows()
    assert [(r["layer"], r["multiplier"]) for r in rows] == [(l, m) for l in (8, 15) for m in (-1.0, 0.0, 1.0)]
    for row in rows:
        assert set(row) >= {"layer", "multiplier", "p_match", "n", "option_mass", "logit_diff"}
        assert row["n"] == 6 and 0.0 < row["p_match"] < 1.0 and 0.0 < row["option_mass"] <= 1.0
    # Multiplier 0 is one unsteered baseline: identical for every layer, question by question.
    np.testing.assert_array_equal(sweep.p_match[0, 1], sweep.p_match[1, 1])
    assert sweep.mean(8, 0.0) == sweep.mean(15, 0.0)


def test_strong_random_vector_changes_p_match(sweep: SweepResult) -> None:
    base = sweep.p_match[:, 1]
    for j in (0, 2):
        assert np.abs(sweep.p_match[:, j] - base).max() > 0.02
    assert np.abs(sweep.option_mass[:, 2] - sweep.option_mass[:, 1]).max() > 0.01


def test_steerability_and_anti_steerable(sweep: SweepResult) -> None:
    per_q = sweep.question_slopes()
    assert per_q.shape == (2, 6)
    slopes = sweep.steerability()
    for i, layer in enumerate(sweep.layers):
        x = np.array(sweep.multipliers)
        expected = np.polyfit(x, sweep.logit_diff[i].mean(axis=-1), 1)[0]
        assert slopes[layer] == pytest.approx(expected)
        assert per_q[i].mean() == pytest.approx(expected)
        assert sweep.anti_steerable()[layer] == pytest.approx(np.mean(per_q[i] * expected < 0))


def test_json_round_trip(sweep: SweepResult) -> None:
    sweep.info.update(model="m", vector="v.gguf", dataset="sentiment", backend="native")
    data = json.loads(json.dumps(sweep.to_json()))
    assert list(data)[:5] == ["model", "vector", "dataset", "backend", "results"]
    back = SweepResult.from_json(data)
    assert back.layers == sweep.layers and back.multipliers == sweep.multipliers
    np.testing.assert_allclose(back.logit_diff, sweep.logit_diff, atol=1e-5)
    rows = analyze.steerability_table(data)
    assert [r["layer"] for r in rows] == [8, 15]
    with pytest.raises(CaaError, match="per_question"):
        SweepResult.from_json({"results": []})


def test_fast_path_equals_naive_with_letters_beyond_b(engine: Engine) -> None:
    survival = load_ab("survival-instinct").items[663]
    assert survival.matching_letter == "C"
    shortest = sorted(split(load_ab("sentiment").items, "val"), key=lambda it: len(it.question))[:2]
    choices = choices_from_items([*shortest, survival])
    vector = random_vector(engine.n_embd, [12], norm=30.0, seed=1)
    settings = [(), (engine.make_term("v", vector, 1.0, [12]),)]
    fast = score_ab(engine, choices, settings)
    for setting, scores in zip(settings, fast):
        naive = score_ab_naive(engine, choices, setting)
        np.testing.assert_allclose(scores.logp_matching, naive.logp_matching, atol=2e-3)
        np.testing.assert_allclose(scores.logp_not_matching, naive.logp_not_matching, atol=2e-3)
    assert not np.allclose(fast[0].logp_matching, fast[1].logp_matching, atol=1e-3)


def test_a_question_set_scored_again_reuses_its_decoded_prefixes(
        engine: Engine, items: list[ABItem], monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibration scores its validation questions again after the layer sweep: the context
    keeps the scorers of A/B question sets, so the second scoring decodes only the steered
    tails, and scores exactly as a context that never saw the questions."""
    import caa_local.engine.engine as engine_module

    vector = random_vector(engine.n_embd, [12], norm=30.0, seed=3)
    choices = choices_from_items(items)
    first = [(), (engine.make_term("v", vector, -1.0, [12]),)]
    again = [(engine.make_term("v", vector, 1.5, [12]),), ()]
    score_ab(engine, choices, first)
    prepared = [scoring._prepare(engine, c) for c in choices]
    kept = engine.scorer([p.prefix for p in prepared], 2, 1, keep=True)
    assert engine.scorer([p.prefix for p in prepared], 2, 1, keep=True) is kept  # no second decode
    reused = score_ab(engine, choices, again)
    fresh = score_ab(engine.new_context(), choices, again)
    for a, b in zip(reused, fresh):
        np.testing.assert_array_equal(a.logp_matching, b.logp_matching)
        np.testing.assert_array_equal(a.logp_not_matching, b.logp_not_matching)
    assert not np.array_equal(reused[0].logp_matching, reused[1].logp_matching)
    # Scorers that are not kept (perplexities) or do not fit the budget are made anew.
    assert engine.scorer([p.prefix for p in prepared], 2, 1) is not kept
    monkeypatch.setattr(engine_module, "KEPT_SCORER_BYTES", 0)
    engine.scorer([p.prefix for p in prepared], 2, 1, keep=True)  # handed out, then let go
    assert engine.scorer([p.prefix for p in prepared], 2, 1, keep=True) is not kept


def test_options_that_differ_in_their_last_token_score_as_when_decoded_one_by_one(engine: Engine) -> None:
    """Options that differ only in their last token share one decode; a third option that differs
    earlier makes the scorer decode every option alone: the first two score the same both ways."""
    from caa_local.engine.scoring import _prepare

    shortest = sorted(split(load_ab("sentiment").items, "val"), key=lambda it: len(it.question))[:3]
    prepared = [_prepare(engine, choice) for choice in choices_from_items(shortest)]
    shared = [p.continuations for p in prepared]
    apart = [[*conts, [conts[0][0], *conts[0]]] for conts in shared]  # one token more before the letter
    vector = random_vector(engine.n_embd, [12], norm=30.0, seed=2)
    for buffer in (None, Steering([engine.make_term("v", vector, 1.0, [12])]).buffer(engine.n_embd, engine.n_layer)):
        extra = () if buffer is None else buffer
        together = engine.scorer([p.prefix for p in prepared], 2, 8).score(
            shared, [p.n_scored for p in prepared], *extra)
        alone = engine.scorer([p.prefix for p in prepared], 3, 8).score(
            apart, [[*p.n_scored, p.n_scored[0]] for p in prepared], *extra)
        np.testing.assert_allclose(together, alone[:, :2], atol=1e-4)
        assert not np.allclose(alone[:, 2], alone[:, 0], atol=1e-3)  # the odd option was scored too


def test_capability_rows(engine: Engine) -> None:
    vector = random_vector(engine.n_embd, [10], norm=30.0)
    result = capability_eval(engine, "truthfulqa", vector, 10, [0, 1], limit=2)
    rows = result.rows()
    assert [r["multiplier"] for r in rows] == [0.0, 1.0]
    assert all(r["n"] == 2 and 0 < r["p_correct"] < 1 and 0 < r["option_mass"] <= 1 for r in rows)
    assert result.at(1.0) != result.at(0.0)
    per_category = capability_eval(engine, "truthfulqa", vector, 10, [0, 1], limit=1, per_category=True)
    assert per_category.n == len(per_category.categories) > 2


def test_open_ended_and_judge(engine: Engine) -> None:
    vector = random_vector(engine.n_embd, [10], norm=30.0)
    engine.unsteer()
    rows = open_ended(engine, vector, [10], [0, 4], ["Describe a sunny day."], max_tokens=8)
    assert [(r["multiplier"], r["layer"], r["prompt"]) for r in rows] == [
        (0.0, 10, "Describe a sunny day."), (4.0, 10, "Describe a sunny day.")]
    assert rows[0]["answer"] and rows[0]["answer"] != rows[1]["answer"]
    assert not engine.steering  # the engine's own steering is restored (none)
    judged = judge(engine, rows, "sentiment")
    assert all("score" in r and "judge_reply" in r for r in judged)
    summary = judge_summary(judged + [{"multiplier": 0.0, "score": None}])
    assert summary[0]["n"] == 2 and summary[0]["unparseable"] >= 1
    exported = export_rows(rows, "sentiment")
    assert exported[0]["rubric"] == RUBRICS["sentiment"] and rows[0]["answer"] in exported[0]["judge_prompt"]


def test_rubrics_cover_every_behavior() -> None:
    from caa_local.core.datasets import DEMO_BEHAVIORS, PAPER_BEHAVIORS

    assert set(RUBRICS) == {*PAPER_BEHAVIORS, *DEMO_BEHAVIORS}


@pytest.mark.parametrize(
    ("reply", "score"),
    [(" 7", 7.0), ("Score: 8.5", 8.5), (" 3/10, because", 3.0), ("On a scale of 0 to 10, I give 6.", 6.0),
     ("10", 10.0), (" 0", 0.0), ("I'd say 4 out of 10", 4.0), ("eleven", None), ("", None), ("42", None)],
)
def test_parse_score(reply: str, score: float | None) -> None:
    assert parse_score(reply) == score


def test_parse_multipliers() -> None:
    assert parse_multipliers("1, -1,0") == [-1.0, 0.0, 1.0]
    for bad, message in (("1,x", "'x' is not a number"), ("1,nan", "finite"), ("1,1", "repeat")):
        with pytest.raises(CaaError, match=message):
            parse_multipliers(bad)


def test_plots_write_pngs(sweep: SweepResult, tmp_path: Path) -> None:
    assert is_png(plots.p_match_vs_multiplier(sweep, tmp_path / "mult.png"))
    assert is_png(plots.p_match_vs_layer(sweep, tmp_path / "layers.png"))
    summary = [{"multiplier": m, "sentiment": m / 4, "distinct_2": 0.9} for m in (-2, 0, 2)]
    assert is_png(plots.metric_vs_multiplier(summary, "sentiment", tmp_path / "metric.png"))
    rng = np.random.default_rng(0)
    acts = {"matching": rng.normal(1, 1, (10, 2, 16)), "not_matching": rng.normal(-1, 1, (10, 2, 16))}
    projections = analyze.pca_layers(acts, [3, 9])
    assert projections[3].separation > 0.9 and sum(projections[3].explained) <= 1.0 + 1e-9
    shared = rng.normal(0, 5, (20, 16))
    assert analyze.pair_accuracy(shared + rng.normal(1.0, 1, (20, 16)), shared) > 0.9
    points = {layer: (p.xy, np.r_[np.ones(10, bool), np.zeros(10, bool)]) for layer, p in projections.items()}
    assert is_png(plots.pca_grid(points, tmp_path / "pca.png", "t", ["A", "B"] * 10))
    names, matrix = analyze.layer_cosines(random_vector(16, range(1, 5), 1.0))
    np.testing.assert_allclose(np.diag(matrix), 1.0)
    assert is_png(plots.heatmap(matrix, [str(n) for n in names], tmp_path / "heat.png"))
    with pytest.raises(CaaError, match="file exists"):
        plots.heatmap(matrix, [str(n) for n in names], tmp_path / "heat.png")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.torch
def test_torch_reference_agrees(engine: Engine, items: list[ABItem], hf_model: tuple) -> None:
    from caa_local.eval.ab import ab_sweep_torch

    model, tokenizer, template = hf_model
    vector = random_vector(engine.n_embd, [10], norm=30.0)
    import torch

    native = ab_sweep(engine, vector, items[:1], [10], [0, 1])
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)  # as for llama.cpp: spinning threads stall on a shared CPU
    try:
        reference = ab_sweep_torch(model, tokenizer, template, vector, items[:1], [10], [0, 1])
    finally:
        torch.set_num_threads(threads)
    # Q4_1 weights in llama.cpp vs their float32 dequantization in torch: close, not equal.
    np.testing.assert_allclose(native.logit_diff, reference.logit_diff, atol=0.5)
    np.testing.assert_allclose(native.option_mass, reference.option_mass, atol=0.05)
