"""Conditional steering on the default model: the native score, exact greedy equalities, the
held-out F1 of the shipped condition, the REPL and the CLI's errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from caa_local.chat.repl import ChatSession
from caa_local.core.condition import KEY_CALIBRATION, cast_score, last_user_span
from caa_local.core.condition_data import load_condition_data
from caa_local.core.locate import load_vector
from caa_local.core.templates import Message
from caa_local.engine.condition_reads import prompt_reads
from caa_local.engine.engine import Engine, Sampling
from tests.conftest import one_error, run_cli

pytestmark = pytest.mark.slow

GREEDY = Sampling(temperature=0.0, max_tokens=24)
WORK = "How do I ask my manager for a raise at my job?"
OTHER = "What is a good recipe for banana bread?"


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(n_ctx=1024, n_threads=1)


@pytest.fixture(scope="module")
def work() -> Any:
    return load_vector("work")[1]


@pytest.fixture(scope="module")
def sentiment() -> Any:
    return load_vector("sentiment")[1]


def user(text: str) -> list[Message]:
    return [{"role": "user", "content": text}]


def conditional(engine: Engine, sentiment: Any, work: Any, threshold: float | None = None) -> Engine:
    term = engine.make_term("sentiment", sentiment, 2.0).with_conditions(
        [engine.make_condition("work", work, threshold)])
    engine.set_steering([term])
    return engine


def test_the_shipped_condition_fires_on_work_prompts_only(engine: Engine, sentiment: Any, work: Any) -> None:
    conditional(engine, sentiment, work)
    fired = engine.generate(user(WORK), GREEDY).conditions
    quiet = engine.generate(user(OTHER), GREEDY).conditions
    assert [r["fired"] for r in fired] == [True] and [r["fired"] for r in quiet] == [False]
    assert fired[0]["condition"] == "work" and fired[0]["vector"] == "sentiment"
    engine.unsteer()


@pytest.mark.parametrize("fire", [True, False], ids=["fired", "not-fired"])
def test_greedy_answer_equals_the_plain_one(sentiment: Any, work: Any, fire: bool) -> None:
    """Fired: token for token the plainly steered answer; not fired: the unsteered one. Each in
    a fresh context, so both decode the same batches (exact by construction)."""
    reference = Engine(n_ctx=512, n_threads=1)
    if fire:
        reference.steer("sentiment", sentiment, 2.0)
    expected = reference.generate(user(OTHER), GREEDY)
    gated = conditional(Engine(reference.model, 512, 1), sentiment, work)
    comparison = gated.make_condition("work", work).comparison
    # A threshold no cosine passes (or every one does) decides the outcome.
    threshold = (-2.0 if comparison == "above" else 2.0) if fire else (2.0 if comparison == "above" else -2.0)
    gated = conditional(gated, sentiment, work, threshold)
    result = gated.generate(user(OTHER), GREEDY)
    assert [r["fired"] for r in result.conditions] == [fire]
    assert result.tokens == expected.tokens and result.text == expected.text
    assert [t["name"] for t in result.steering] == ["sentiment"]
    assert ("when" not in result.steering[0]) == fire  # fired: it steered as a plain term
    assert gated.steering.conditional  # the condition stays for the next answer


def test_a_later_turn_reads_the_same_score_as_a_fresh_context(engine: Engine, sentiment: Any, work: Any) -> None:
    """With the history reused from the cache, the span is counted from the first token decoded
    in this turn: the score equals a fresh context's (the history prefilled in both)."""
    history: list[Message] = [{"role": "user", "content": OTHER}, {"role": "assistant", "content": "Mash two bananas."}]
    conditional(engine, sentiment, work)
    engine.reset()
    engine.generate([*history, *user("Thanks, and how long should it bake?")], GREEDY)
    later = engine.generate([*history, *user(WORK)], GREEDY)
    assert later.n_reused_tokens > 0
    fresh = conditional(Engine(engine.model, 1024, 1), sentiment, work).generate([*history, *user(WORK)], GREEDY)
    assert fresh.n_reused_tokens == 0
    # Not bitwise: the history was decoded as a batch of its own. Measured on the default model:
    # block outputs 0.8% apart (2% on the score), against 7-10% for a span off by one token.
    assert later.conditions[0]["score"] == pytest.approx(fresh.conditions[0]["score"], rel=0.05)
    engine.unsteer()


def test_reader_and_generation_probe_agree(engine: Engine, sentiment: Any, work: Any) -> None:
    """Extraction (the batched Reader) and generation (the probe on the chat context) read the same rows."""
    condition = engine.make_condition("work", work)
    reads = prompt_reads(engine, [WORK], [condition.layer])[0, 0]
    conditional(engine, sentiment, work)
    score = engine.generate(user(WORK), GREEDY).conditions[0]["score"]
    assert cast_score(reads, condition.direction) == pytest.approx(score, rel=1e-4, abs=1e-6)
    engine.unsteer()


@pytest.mark.torch
def test_native_score_equals_the_torch_score(sentiment: Any, work: Any, hf_model: tuple[Any, Any, Any],
                                             tmp_path_factory: pytest.TempPathFactory) -> None:
    """The score read while generating equals CAST's score of transformers' block outputs on the
    same tokens, to 1e-3 relative. Both on the same weights: transformers dequantizes the GGUF,
    so llama.cpp runs its F32 copy (on the Q4_1 file itself the block outputs differ by ~1%, the
    quantization's doing: measured 1.5e-3 to 2.5e-3 relative on these scores)."""
    from caa_local.core.locate import default_model_path
    from caa_local.torch.condition import token_reads
    from tests.gguf_f32 import dequantized_copy

    model, _tokenizer, _template = hf_model
    f32 = Engine(dequantized_copy(default_model_path(), tmp_path_factory.mktemp("f32") / "f32.gguf"), 1024, 1)
    condition = f32.make_condition("work", work)
    conditional(f32, sentiment, work)
    for prompt in (WORK, OTHER):
        messages = user(prompt)
        tokens, _ = f32.prompt(messages)
        start, end = last_user_span(f32.template, f32.tokenize, messages, tokens)
        torch_score = condition.score(token_reads(model, [(tokens[:end], end - start)], [condition.layer])[0, 0])
        native = f32.generate(messages, GREEDY).conditions[0]["score"]
        assert abs(torch_score) > 0.01  # a relative comparison needs a score away from 0
        assert native == pytest.approx(torch_score, rel=1e-3)


def test_shipped_condition_held_out_f1(engine: Engine, work: Any) -> None:
    """The test split (never used to extract or calibrate) read now: F1 >= 0.9."""
    condition = engine.make_condition("work", work)
    pos, neg = load_condition_data(["work"]).part("test")
    scores = [cast_score(prompt_reads(engine, side, [condition.layer])[:, 0], condition.direction) for side in (pos, neg)]
    tp = sum(condition.fires(s) for s in scores[0])
    fp = sum(condition.fires(s) for s in scores[1])
    precision, recall = tp / max(tp + fp, 1), tp / len(pos)
    f1 = 2 * precision * recall / (precision + recall)
    assert f1 >= 0.9, (precision, recall)
    recorded = json.loads(work.metadata[KEY_CALIBRATION])["test"]
    assert abs(recorded["f1"] - f1) < 0.05  # what calibrate stored is what this model does


def test_repl_when_and_conditions(engine: Engine) -> None:
    written: list[str] = []
    session = ChatSession(engine, GREEDY, write=written.append)
    session.handle("/steer sentiment 2")
    out = session.handle("/when sentiment work")
    assert "when work" in out
    session.handle(WORK)
    assert "fired" in session.status() and "not fired" not in session.status()
    session.handle(OTHER)
    assert "not fired" in session.status()
    listing = session.handle("/conditions")
    assert "sentiment x+2" in listing and "last answer: sentiment when work: not fired" in listing
    assert session.transcript[-1]["conditions"][0]["condition"] == "work"
    for bad, message in [("/when sentiment nosuch", "no vector named 'nosuch'"), ("/when sentiment formality", "behavior vector"),
                         ("/when sentiment work nan", "finite"), ("/when nobody work", "no active vector"),
                         ("/steer work", "is a condition")]:
        assert "Error:" in session.handle(bad) and message in "".join(written[-1:]), bad
    assert "when" not in session.handle("/when sentiment always")
    assert not engine.steering.conditional
    engine.unsteer()


def other_model_condition(tmp_path: Path, work: Any) -> Path:
    from caa_local.core.vector import ControlVector

    small = {layer: np.ones(64, np.float32) for layer in work.layers}
    path = tmp_path / "small.gguf"
    ControlVector("llama", small, dict(work.metadata)).save(path)
    return path


def test_cli_generate_when_and_its_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, work: Any) -> None:
    base = ["generate", WORK, "--threads", "1", "--max-tokens", "4", "--temperature", "0"]
    code, _out, err = run_cli(capsys, *base, "--vector", "sentiment", "--when", "work", "--json",
                              str(tmp_path / "a.json"))
    assert code == 0 and "sentiment when work: fired" in err
    assert json.loads((tmp_path / "a.json").read_text())["conditions"][0]["fired"] is True
    cases = [
        (["--vector", "sentiment", "--when", "nosuch"], "nosuch"),
        (["--vector", "sentiment", "--when", "formality"], "is a behavior vector, not a condition"),
        (["--vector", "sentiment", "--when", "work:nan"], "finite"),
        (["--vector", "sentiment", "--when", str(other_model_condition(tmp_path, work))], "n_embd is 576"),
        (["--vector", "work"], "is a condition, not a behavior vector"),
        (["--when", "work"], "--when gates the --vector terms"),
        (["--vector", "sentiment", "--when", "work", "--positions", "all"], "--positions response"),
    ]
    for extra, message in cases:
        line = one_error(*run_cli(capsys, *base, *extra)[:3:2])
        assert message in line, (extra, line)


def test_two_paper_behaviors_make_a_condition_with_held_out_f1(capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    """The paper's A/B questions of two behaviors are two topics: extract, calibrate, read the
    test split's confusion from the file (prompts never used to extract or calibrate)."""
    out = tmp_path / "topic.gguf"
    code, stdout, err = run_cli(capsys, "condition", "extract", "myopic-reward", "corrigible-neutral-HHH",
                                "--limit", "60", "--layers", "2,8,13", "--threads", "1", "--out", str(out),
                                "--calibrate")
    assert code == 0, err
    vector = load_vector(str(out))[1]
    assert vector.kind == "condition" and vector.metadata["method"] in ("pca", "mean-diff")
    summary = json.loads(vector.metadata[KEY_CALIBRATION])
    assert summary["n_test"] == [12, 12] and summary["test"]["f1"] >= 0.9, summary
    assert "test  F1" in stdout and "method" in stdout
    # Calibrating again needs --force; an unknown dataset is one clear error.
    assert "already calibrated" in one_error(*run_cli(capsys, "calibrate", str(out))[:3:2])
    assert "no such condition" in one_error(*run_cli(capsys, "condition", "extract", "nosuch")[:3:2])
