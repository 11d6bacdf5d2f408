"""`caa-local calibrate`: the guard, the limits, the metadata and its round trips, the command on the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caa_local.core.normalize import normalize
from caa_local.core.vector import ControlVector, no_layer_warning
from caa_local.eval.calibrate import Settings, calibrated, card_lines, split_prompts
from caa_local.eval.coherence import FOLLOW_UPS, Guard, build_conversations, limits

from conftest import run_cli

N_EMBD = 16


def _vector(layers: list[int] = [3, 5, 7], seed: int = 0, **meta: str) -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector("llama", {layer: rng.normal(size=N_EMBD) for layer in layers}, {"behavior": "b", **meta})


def _point(mult: float, ratio: float = 1.0, broken: float = 0.0, repetition: float = 0.0, **extra: object) -> dict:
    return {"multiplier": mult, "perplexity_ratio": ratio, "broken": broken, "repetition": repetition, **extra}


def _summary(positive: float = 2.0, negative: float | None = -1.5) -> dict:
    curve = [_point(m, metric=0.1 * m, passed=True, failures=[]) for m in (-1.5, 0.0, 1.0, 2.0)]
    curve.append(_point(3.0, 4.0, 0.5, metric=0.1, passed=False, failures=["perplexity x4.00 > x2"]))
    return {"version": 1, "behavior": "b", "model": "m.gguf", "metric": "sentiment", "layer": 5,
            "layer_choice": {"method": "given", "scores": {}}, "recommended_multiplier": positive,
            "positive_limit": positive, "negative_limit": negative, "curve": curve, "n": 6, "conversations": 3,
            "card": {"mmlu": {"n": 4, "at_0": 0.5, "at_recommended": 0.25, "change": -0.25}}}


# -- the guard --------------------------------------------------------------------------------
def test_guard_passes_the_unsteered_level_and_rejects_a_broken_strength() -> None:
    guard, base = Guard(), _point(0.0, broken=1 / 12, repetition=0.05)
    assert guard.failures(_point(1.0, 1.3, 1 / 12, 0.08), base) == []
    # what x20 looks like: answers the unsteered model finds 30x less likely, most turns broken
    reasons = guard.failures(_point(20.0, 30.0, 0.75, 0.6), base)
    assert len(reasons) == 3 and "perplexity x30.00" in reasons[0] and "75% broken" in reasons[1]
    assert guard.failures(_point(2.0, float("nan")), base)  # NaN never passes
    assert guard.failures(_point(2.0, 1.0, 2 / 12), base)  # one broken turn more than unsteered


def test_limits_stop_at_each_sides_first_failure() -> None:
    ok, bad = dict(passed=True), dict(passed=False)
    curve = [_point(-2, **bad), _point(-1, **ok), _point(0, **ok), _point(0.5, **ok), _point(1, **bad), _point(2, **ok)]
    assert limits(curve) == (0.5, -1)  # +2 passing after +1 failed does not count
    assert limits([_point(0, **ok), _point(1, **bad), _point(-1, **bad)]) == (None, None)


def test_conversations_alternate_held_out_prompts_and_follow_ups() -> None:
    prompts = [f"p{i}" for i in range(40)]
    probe, conversations = split_prompts(prompts, Settings(metric="sentiment", layer_prompts=8, conversations=12))
    assert probe == prompts[:8] and len(conversations) == 12
    assert all(len(c) == 3 and c[1] in FOLLOW_UPS for c in conversations)
    openers = [c[0] for c in conversations] + [c[2] for c in conversations]
    assert len(set(openers)) == 24 and not set(openers) & set(probe)
    assert split_prompts(prompts, Settings(metric="p_match"))[0] == []  # A/B layers need no probe
    assert build_conversations(["only"], 2, 1) == [["only"], ["only"]]


def test_settings_refuse_nonsense() -> None:
    from caa_local.core.errors import CaaError

    with pytest.raises(CaaError, match="unknown metric"):
        Settings(metric="vibes")
    with pytest.raises(CaaError, match="non-zero multiplier"):
        Settings(multipliers=(0.0,))
    with pytest.raises(CaaError, match="conversations must be at least 1"):
        Settings(conversations=0)


# -- metadata ---------------------------------------------------------------------------------
def test_calibrated_metadata_round_trips_and_llama_cpp_reads_the_file(tmp_path: Path) -> None:
    vec = calibrated(_vector(recommended_multiplier="9"), _summary())
    path = tmp_path / "v.gguf"
    vec.save(path)
    loaded = ControlVector.load(path)
    assert loaded.recommended_layer() == 5 and loaded.recommended_multiplier() == 2.0
    assert loaded.negative_multiplier_limit() == -1.5
    summary = loaded.calibration()
    assert summary is not None and [p["multiplier"] for p in summary["curve"]] == [-1.5, 0.0, 1.0, 2.0, 3.0]
    from test_vector_fuzz import _ORACLE, _libggml_base  # llama.cpp's own gguf reader

    lib = _libggml_base()
    if lib is None:
        pytest.skip("llama-cpp-python's libggml-base is not installed")
    run = subprocess.run([sys.executable, "-c", _ORACLE, str(lib), str(path)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(json.loads(run.stdout)[0]) == ["direction.3", "direction.5", "direction.7"]


def test_scaling_rescales_the_calibration() -> None:
    vec = calibrated(_vector(), _summary())
    half = vec * 0.5  # x4 on the half-length vector steers like x2 on the original
    assert half.recommended_multiplier() == 4.0 and half.negative_multiplier_limit() == -3.0
    assert [p["multiplier"] for p in half.calibration()["curve"]] == [-3.0, 0.0, 2.0, 4.0, 6.0]
    flipped = -vec  # the sides swap
    assert flipped.recommended_multiplier() == 1.5 and flipped.negative_multiplier_limit() == -2.0
    assert (vec / 2).recommended_multiplier() == 4.0
    gone = vec * 0.0
    assert gone.recommended_multiplier() is None and gone.calibration() is None
    assert gone.recommended_layer() == 5  # the layer still holds
    only_positive = -calibrated(_vector(), _summary(negative=None))
    assert only_positive.recommended_multiplier() is None and only_positive.negative_multiplier_limit() == -2.0


def test_normalize_keeps_the_calibrated_strength_at_its_layer() -> None:
    a, b = calibrated(_vector(seed=1), _summary()), _vector(seed=2)
    out = normalize({"a": a, "b": b})["a"]
    before = a.recommended_multiplier() * a.directions[5]
    after = out.recommended_multiplier() * out.directions[5]
    np.testing.assert_allclose(after, before, rtol=1e-4)
    assert out.calibration()["rescaled_by"] == pytest.approx(np.linalg.norm(out.directions[5]) /
                                                            np.linalg.norm(a.directions[5]), rel=1e-4)
    no_layer = _vector(seed=3, recommended_multiplier="2")
    assert normalize({"n": no_layer, "b": b})["n"].recommended_multiplier() is None


def test_combine_drops_the_calibration_and_says_so(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    calibrated(_vector(seed=1), _summary()).save(tmp_path / "a.gguf")
    _vector(seed=2).save(tmp_path / "b.gguf")
    code, out, err = run_cli(capsys, "vector", "combine", str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf"),
                             "--out", str(tmp_path / "mix.gguf"))
    assert code == 0, err
    mix = ControlVector.load(tmp_path / "mix.gguf")
    assert mix.calibration() is None and mix.recommended_multiplier() is None
    assert "calibrate" in err
    code, _, err = run_cli(capsys, "vector", "combine", f"{tmp_path / 'a.gguf'}:0.5", "--out", str(tmp_path / "h.gguf"))
    assert code == 0, err
    assert ControlVector.load(tmp_path / "h.gguf").recommended_multiplier() == 4.0


def test_no_layer_warning_names_the_layers() -> None:
    warning = no_layer_warning("mine", _vector(), 1.0)
    assert warning is not None and "all its 3 layers (3,5,7) at x1" in warning and "calibrate" in warning
    assert no_layer_warning("mine", _vector(recommended_layer="5"), 1.0) is None


def test_card_lines() -> None:
    lines = card_lines(_summary())
    assert lines[0].startswith("b on m.gguf: layer 5 (given), multiplier x+2, negative limit x-1.5")
    assert any("MMLU (4 questions): 0.500 -> 0.250 (-0.250)" in line for line in lines)


# -- on the default model ---------------------------------------------------------------------
@pytest.mark.slow
def test_calibrate_writes_metadata_that_chat_and_generate_use(capsys: pytest.CaptureFixture[str],
                                                              tmp_path: Path) -> None:
    out, card = tmp_path / "sentiment.gguf", tmp_path / "card.json"
    code, stdout, err = run_cli(capsys, "calibrate", "sentiment", "--quick", "--threads", "1", "--layers", "22-23",
                                "--multipliers", "1,20,-1", "--val-limit", "4", "--conversations", "2", "--limit", "4",
                                "--out", str(out), "--json", str(card))
    assert code == 0, err
    summary = json.loads(card.read_text())
    vec = ControlVector.load(out)
    assert vec.calibration() == summary and summary["layer"] in (22, 23)
    assert vec.recommended_layer() == summary["layer"] and vec.recommended_multiplier() == 1.0
    by = {p["multiplier"]: p for p in summary["curve"]}
    assert by[20.0]["passed"] is False and by[20.0]["failures"]  # x20 is gibberish: the guard says so
    assert summary["positive_limit"] == 1.0 and set(by) == {-1.0, 0.0, 1.0, 20.0}
    assert {"metric", "perplexity_ratio", "broken", "repetition"} <= set(by[1.0])
    assert summary["card"]["p_match"]["split"] == "val" and summary["card"]["mmlu"]["n"] == 4
    assert len(summary["model_sha256"]) == 64 and summary["n"] == 4 and summary["seed"] == 0
    assert f"layer {summary['layer']}" in stdout and "MMLU (4 questions)" in stdout and "wrote" in stdout
    # calibrating again needs --force; generate then steers at the recorded layer and multiplier
    code, _, err = run_cli(capsys, "calibrate", str(out), "--quick")
    assert code == 1 and "already calibrated" in err and "Traceback" not in err
    answer = tmp_path / "answer.json"
    code, _, err = run_cli(capsys, "generate", "Hi", "--vector", str(out), "--max-tokens", "4", "--threads", "1",
                           "--json", str(answer))
    assert code == 0, err
    steering = json.loads(answer.read_text())["steering"]
    assert steering[0]["layers"] == [summary["layer"]] and steering[0]["scale"] == 1.0
    assert "no recommended layer" not in err


@pytest.mark.slow
def test_generate_warns_about_a_vector_without_a_layer(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    raw = ControlVector.load(Path(__file__).parent.parent / "vectors" / "sentiment.gguf")
    bare = ControlVector(raw.model_hint, {layer: raw.directions[layer] for layer in (5, 6)}, {"behavior": "x"})
    bare.save(tmp_path / "bare.gguf")
    code, _, err = run_cli(capsys, "generate", "Hi", "--vector", str(tmp_path / "bare.gguf"), "--max-tokens", "2",
                           "--threads", "1")
    assert code == 0, err
    assert err.count("no recommended layer") == 1 and "all its 2 layers (5-6) at x1" in err


def test_extract_calibrate_needs_a_gguf_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "extract", "sycophancy", "--model", "meta-llama/Llama-2-7b-chat-hf",
                           "--calibrate", "--out", str(tmp_path / "s.gguf"))
    assert code == 1 and err.count("Error:") == 1 and "calibrate" in err and "Traceback" not in err
    assert not (tmp_path / "s.gguf").exists()


def test_calibrate_refuses_bad_input_before_loading_a_model(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    path = tmp_path / "v.gguf"
    calibrated(_vector(), _summary()).save(path)
    cases = [
        (["calibrate", str(path)], "already calibrated"),
        (["calibrate", str(tmp_path / "none.gguf")], "no such vector file"),
        (["calibrate", str(path), "--force", "--multipliers", "0"], "non-zero multiplier"),
        (["calibrate", str(path), "--force", "--multipliers", "1,x"], "bad multipliers list"),
        (["calibrate", str(path), "--force", "--dataset", str(tmp_path / "missing.json")], "no such dataset"),
    ]
    for args, message in cases:
        code, _, err = run_cli(capsys, *args)
        assert code != 0 and message in err and "Traceback" not in err, (args, err)


def test_certain_failure_only_when_no_remaining_turn_can_rescue() -> None:
    guard, base = Guard(), {"perplexity": 10.0, "broken": 0.0, "repetition": 0.1}
    assert not guard.certain_failure([12.0], [False], [0.1], 6, base)
    assert guard.certain_failure([12.0], [True], [0.1], 6, base)  # a broken turn: the share can only stay > 0
    assert guard.certain_failure([12.0, 11.0], [False, False], [0.9, 0.9], 6, base)  # 1.8 / 6 > 0.1 + 0.1
    assert not guard.certain_failure([25.0, 30.0, 12.0], [False] * 3, [0.1] * 3, 6, base)  # 2 of 6 above x2
    assert guard.certain_failure([25.0, 30.0, 40.0, 21.0], [False] * 4, [0.1] * 4, 6, base)  # 4 of 6: the median too


def test_search_finds_the_walks_limits_within_one_grid_step() -> None:
    """On a shipped vector with small sizes (enough conversations for the search to screen on a
    third of them): the batched search against the exhaustive walk."""
    import dataclasses

    from caa_local.chat.repl import CHAT_SAMPLING
    from caa_local.core.locate import load_vector
    from caa_local.engine.engine import Engine
    from caa_local.eval.calibrate import DEFAULT_MULTIPLIERS, QUICK
    from caa_local.eval.coherence import GENERIC_PROMPTS, SCREEN_MIN_CONVERSATIONS, strength_curve, strength_walk

    engine = Engine(n_ctx=1024, n_threads=2)
    _, vector = load_vector("sentiment")
    layer = vector.recommended_layer() or vector.layers[0]
    conversations = build_conversations(GENERIC_PROMPTS, SCREEN_MIN_CONVERSATIONS, QUICK["turns"])
    sampling = dataclasses.replace(CHAT_SAMPLING, max_tokens=QUICK["max_tokens"])
    grid = (*(-m for m in DEFAULT_MULTIPLIERS), *DEFAULT_MULTIPLIERS)
    log: list[str] = []
    walk = strength_walk(engine, vector, layer, conversations, grid, Guard(), "sentiment", sampling)
    search = strength_curve(engine, vector, layer, conversations, grid, Guard(), "sentiment", sampling,
                            log=log.append)
    for side, walked, searched in zip((1, -1), limits(walk), limits(search)):
        ordered = sorted((m for m in grid if m * side > 0), key=abs)
        index = {None: -1, **{m: i for i, m in enumerate(ordered)}}
        assert abs(index[walked] - index[searched]) <= 1, (side, walked, searched, log)
    assert all(p["passed"] == (not p["failures"]) for p in search)
    n_turns = SCREEN_MIN_CONVERSATIONS * QUICK["turns"]
    assert any(p.get("screened") for p in search), log
    for limit in limits(search):  # what it recommends answered every conversation
        if limit is not None:
            assert next(p for p in search if p["multiplier"] == limit)["n"] == n_turns, log
    print(f"walk: {len(walk)} settings, search: {len(search)} settings "
          f"({sum(1 for p in search if p.get('stopped_early'))} stopped early); limits {limits(walk)} vs {limits(search)}")
