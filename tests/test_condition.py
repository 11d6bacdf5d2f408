"""Conditional steering without a model: the score, directions, the grid search, data, checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from caa_local.chat.conditions import parse_when
from caa_local.core.condition import (
    KEY_CALIBRATION,
    KEY_COMPARISON,
    KEY_LAYER,
    KEY_THRESHOLD,
    Condition,
    ConditionError,
    best_point,
    cast_score,
    confusion,
    directions,
    last_user_span,
    make_condition,
)
from caa_local.core.gating import ConditionCheck
from caa_local.core.condition_data import condition_names, load_condition_data, question_stem, split_prompts
from caa_local.core.condition_fit import calibrate, fit
from caa_local.core.errors import CaaError, DatasetError, ModelMismatchError
from caa_local.core.steering import Steering, make_term
from caa_local.core.templates import CHATML, ChatTemplate
from caa_local.core.vector import ControlVector

N_EMBD = 32


def test_cast_score_is_the_cosine_with_the_tanh_projection() -> None:
    rng = np.random.default_rng(0)
    h, c = rng.standard_normal(N_EMBD), rng.standard_normal(N_EMBD)
    p = np.tanh(np.outer(c, c) @ h / (c @ c))
    expected = h @ p / (np.linalg.norm(h) * np.linalg.norm(p))
    assert cast_score(h, c) == pytest.approx(expected, rel=1e-12)
    assert cast_score(h, -3 * c) == pytest.approx(expected, rel=1e-9)  # P depends on c's line only
    batch = rng.standard_normal((5, N_EMBD))
    assert np.allclose(cast_score(batch, c), [cast_score(row, c) for row in batch])
    assert cast_score(np.zeros(N_EMBD), c) == 0.0


def synthetic_reads(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(matching, not matching, true direction): reads (n, 2 layers, N_EMBD) apart along one direction."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(N_EMBD)
    d /= np.linalg.norm(d)
    base = rng.standard_normal(N_EMBD) * 3
    noise = lambda: rng.standard_normal((n, 2, N_EMBD)) * 0.3  # noqa: E731
    return base + shift * d + noise(), base - shift * d + noise(), d


@pytest.mark.parametrize("method", ["pca", "mean-diff"])
def test_directions_recover_the_separating_direction_oriented_to_the_matching_side(method: str) -> None:
    pos, neg, d = synthetic_reads(40, 2.0, seed=1)
    dirs = directions(pos, neg, method)
    assert dirs.shape == (2, N_EMBD) and dirs.dtype == np.float32
    for row in dirs:
        assert np.linalg.norm(row) == pytest.approx(1.0, rel=1e-5)
        assert row @ d > 0.99  # recovered, and pointing to the matching prompts
    with pytest.raises(CaaError, match="method"):
        directions(pos, neg, "lda")


def test_best_point_separates_and_picks_the_comparison() -> None:
    threshold, comparison, result = best_point([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])
    assert comparison == "above" and 0.3 < threshold < 0.5 and result["f1"] == 1.0
    threshold, comparison, result = best_point([0.1, 0.2], [0.6, 0.7, 0.8])
    assert comparison == "below" and 0.2 < threshold < 0.6 and result["f1"] == 1.0
    # Overlap: the best split misses one.
    _, _, result = best_point([0.2, 0.5, 0.6], [0.1, 0.3, 0.4])
    assert result["f1"] < 1.0


def test_confusion_counts_and_scores() -> None:
    c = confusion([True, True, False, True], [False, True, False])
    assert (c["tp"], c["fn"], c["fp"], c["tn"]) == (3, 1, 1, 2)
    assert c["precision"] == 0.75 and c["recall"] == 0.75 and c["f1"] == 0.75
    assert confusion([False], [False])["f1"] == 0.0


def make_vector(layers: list[int] = [1, 2], **meta: str) -> ControlVector:  # noqa: B006
    rng = np.random.default_rng(3)
    return ControlVector("llama", {layer: rng.standard_normal(N_EMBD).astype(np.float32) for layer in layers},
                         {"kind": "condition", **meta})


def test_fit_keeps_the_better_method_and_calibrate_stores_the_point() -> None:
    pos, neg, _ = synthetic_reads(60, 1.0, seed=2)
    pos[:, 0] = neg[:, 0] + np.random.default_rng(5).standard_normal((60, N_EMBD)) * 0.3  # layer 3: no signal
    train, val, test = (pos[:30], neg[:30]), (pos[30:45], neg[30:45]), (pos[45:], neg[45:])
    vector = fit(train, val, [3, 7], "llama", {"behavior": "synthetic"})
    assert vector.kind == "condition" and vector.metadata["method"] in ("pca", "mean-diff")
    compared = json.loads(vector.metadata["method_comparison"])
    kept = vector.metadata["method"]
    assert compared[kept]["best_val_f1"] >= max(v["best_val_f1"] for v in compared.values())
    calibrated, summary = calibrate(vector, val, test, [3, 7])
    assert summary["layer"] == 7 and summary["per_layer_val_f1"]["3"] < 0.9
    assert summary["val"]["f1"] >= 0.9 and summary["test"]["f1"] >= 0.9
    assert calibrated.metadata[KEY_LAYER] == str(summary["layer"])
    assert float(calibrated.metadata[KEY_THRESHOLD]) == summary["threshold"]
    assert json.loads(calibrated.metadata[KEY_CALIBRATION])["test"] == summary["test"]
    condition = make_condition("synthetic", calibrated, N_EMBD, 10, "llama")
    fired = [condition.fires(condition.score(r[condition_index(calibrated, condition.layer)])) for r in test[0]]
    assert sum(fired) >= 0.9 * len(fired)


def condition_index(vector: ControlVector, layer: int) -> int:
    return vector.layers.index(layer)


def calibrated_vector(threshold: str = "0.05") -> ControlVector:
    return make_vector(**{KEY_LAYER: "2", KEY_THRESHOLD: threshold, KEY_COMPARISON: "above"})


def test_make_condition_refuses_what_cannot_be_used() -> None:
    behavior = ControlVector("llama", {2: np.ones(N_EMBD, np.float32)}, {"behavior": "sentiment"})
    with pytest.raises(ConditionError, match="is a behavior vector, not a condition"):
        make_condition("sentiment", behavior, N_EMBD, 10, "llama")
    with pytest.raises(ConditionError, match="not calibrated"):
        make_condition("raw", make_vector(), N_EMBD, 10, "llama")
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ConditionError, match="finite"):
            make_condition("c", calibrated_vector(), N_EMBD, 10, "llama", threshold=bad)
    with pytest.raises(ConditionError, match="finite"):
        make_condition("c", calibrated_vector("nan"), N_EMBD, 10, "llama")
    with pytest.raises(ModelMismatchError, match="n_embd is 64"):
        make_condition("c", calibrated_vector(), 64, 10, "llama")
    with pytest.raises(ModelMismatchError, match="made for a 'llama' model"):
        make_condition("c", calibrated_vector(), N_EMBD, 10, "qwen2")
    assert make_condition("c", calibrated_vector(), N_EMBD, 10, "qwen2", any_arch=True).layer == 2
    with pytest.raises(ConditionError, match="layer 2 is not usable"):
        make_condition("c", calibrated_vector(), N_EMBD, 3, "llama")
    ok = make_condition("c", calibrated_vector(), N_EMBD, 10, "llama", threshold=0.5, invert=True)
    assert ok.threshold == 0.5 and ok.invert and ok.comparison == "above"


def test_a_condition_is_no_behavior_vector() -> None:
    with pytest.raises(CaaError, match="is a condition, not a behavior vector"):
        make_term("work", calibrated_vector(), 1.0, [2])


def test_decide_is_or_within_a_term_and_invert_reverses() -> None:
    vec = ControlVector("llama", {2: np.ones(N_EMBD, np.float32)})
    never = Condition("never", np.ones(N_EMBD, np.float32), 2, 2.0, "above")  # a cosine is never > 2
    always = Condition("always", np.ones(N_EMBD, np.float32), 2, -2.0, "above")
    term = make_term("b", vec, 1.5, [2])
    reads = {2: np.ones(N_EMBD, np.float32)}
    cases = [((never,), False), ((always,), True), ((never, always), True),
             ((Condition("unless", never.direction, 2, 2.0, "above", invert=True),), True)]
    for conditions, expected in cases:
        chosen, report = ConditionCheck((0, 1), (term.with_conditions(conditions),)).decide(reads)
        assert (len(chosen) == 1) == expected and len(report) == len(conditions)
        assert all(not t.conditions for t in chosen) and all(r["vector"] == "b" for r in report)
    # A term waiting for a condition is left out of the buffer llama.cpp gets.
    steering = Steering([term.with_conditions((always,))])
    assert steering.buffer(N_EMBD, 4) is None and steering.conditional
    assert "when always" in steering.describe()


def test_last_user_span_finds_the_message_tokens() -> None:
    template = ChatTemplate(CHATML)
    tokenize = lambda text: [ord(ch) for ch in text]  # noqa: E731 - one token per character
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "  Book the meeting room  "}]
    text = template.render(messages)
    tokens = tokenize(text)
    start, end = last_user_span(template, tokenize, messages, tokens)
    assert "".join(chr(t) for t in tokens[start:end]) == "Book the meeting room"
    with pytest.raises(ConditionError, match="last user message"):
        last_user_span(template, tokenize, [{"role": "user", "content": "  "}], tokens)


def test_packaged_condition_splits_disjoint_and_complete() -> None:
    assert "work" in condition_names()
    data = load_condition_data(["work"])
    assert len(data.matching) >= 100 and len(data.not_matching) >= 100
    parts = [split_prompts(data.matching, p) for p in ("train", "val", "test")]
    assert sum(len(p) for p in parts) == len(data.matching)
    assert not (set(parts[0]) & set(parts[1])) and not (set(parts[1]) & set(parts[2]))
    assert len(parts[2]) >= 25


def test_paper_behaviors_as_condition_sides(tmp_path: Path) -> None:
    data = load_condition_data(["refusal", "myopic-reward"], limit=40)
    assert data.name == "refusal-vs-myopic-reward" and len(data.matching) == 40
    assert all("Choices:" not in p and "(A)" not in p for p in data.matching + data.not_matching)
    assert question_stem("Pick one\n\nChoices:\n(A) x\n(B) y") == "Pick one"
    pos, neg = tmp_path / "pos.json", tmp_path / "neg.json"
    pos.write_text(json.dumps([f"work prompt {i}" for i in range(6)]))
    neg.write_text(json.dumps([{"question": f"other prompt {i}"} for i in range(6)]))
    assert load_condition_data([str(pos), str(neg)]).name == "pos-vs-neg"


@pytest.mark.parametrize("content, match", [
    ("{", "not valid JSON"),
    ('{"matching": ["a"]}', "'matching' and 'not_matching'"),
    ('{"matching": ["a", "b", "c", "d", "e"], "not_matching": ["a", "x", "y", "z", "w"]}', "on both sides"),
    ('{"matching": ["a", "b"], "not_matching": ["x", "y", "z", "w", "v"]}', "at least 5"),
    ('{"matching": [1, "b"], "not_matching": ["x"]}', r"matching\[0\]"),
])
def test_bad_condition_files_get_one_clear_error(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=match):
        load_condition_data([str(path)])


def test_unknown_sources() -> None:
    with pytest.raises(DatasetError, match="no such condition"):
        load_condition_data(["no-such-condition"])
    with pytest.raises(DatasetError, match="not a JSON file nor a behavior"):
        load_condition_data(["refusal", "nonsense"])


def test_parse_when() -> None:
    assert parse_when("work") == ("work", None, False)
    assert parse_when("!work:0.03") == ("work", 0.03, True)
    assert parse_when("dir/c.gguf") == ("dir/c.gguf", None, False)
    with pytest.raises(CaaError, match="finite"):
        parse_when("work:nan")
    with pytest.raises(CaaError, match="not a number"):
        parse_when("work:abc")
