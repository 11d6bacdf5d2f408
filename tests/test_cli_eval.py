"""`caa-local eval` and `caa-local analyze` through the real entry point (cli.main), on the
default model with a few questions: the JSON contract, PNGs, and one-line errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from caa_local.core.vector import ControlVector
from conftest import is_png, one_error, run_cli

pytestmark = pytest.mark.slow

THREADS = ["--threads", os.environ.get("CAA_TEST_THREADS", "1")]  # see test_evaluate.py
CONTRACT = {"model", "vector", "dataset", "backend", "results"}
ROW = {"layer", "multiplier", "p_match", "n"}




@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random vectors on layers 10, 15, 20 (norm 40): with and without a recommended layer."""
    rng = np.random.default_rng(0)
    out = {}
    root = tmp_path_factory.mktemp("vectors")
    for name, meta in (("rec", {"recommended_layer": "15", "behavior": "sentiment"}),
                       ("plain", {"behavior": "formality"})):
        directions = {}
        for layer in (10, 15, 20):
            v = rng.standard_normal(576)
            directions[layer] = (v / np.linalg.norm(v) * 40).astype(np.float32)
        out[name] = root / f"{name}.gguf"
        ControlVector("llama", directions, meta).save(out[name])
    return out


def test_ab_json_contract_plot_and_steerability(
    capsys: pytest.CaptureFixture[str], vectors: dict[str, Path], tmp_path: Path
) -> None:
    out, png = tmp_path / "ab.json", tmp_path / "ab.png"
    code, stdout, err = run_cli(capsys, "eval", "ab", "--vector", str(vectors["rec"]), "--dataset", "sentiment",
                            "--limit", "4", "--multipliers", "-1,0,1", "--json", str(out), "--plot", str(png),
                            *THREADS)
    assert code == 0, err
    assert "p(match)" in stdout and "option mass" in stdout
    data = json.loads(out.read_text())
    assert CONTRACT <= set(data)
    assert data["backend"] == "native" and data["dataset"] == "sentiment" and data["vector"] == str(vectors["rec"])
    assert [(r["layer"], r["multiplier"]) for r in data["results"]] == [(15, -1.0), (15, 0.0), (15, 1.0)]
    for row in data["results"]:
        assert ROW <= set(row) and row["n"] == 4 and isinstance(row["p_match"], float)
    assert data["split"] == "val" and "per_question" in data and "15" in data["steerability"]
    assert is_png(png)

    code, stdout, err = run_cli(capsys, "analyze", "steerability", str(out))
    assert code == 0, err
    assert "steerability" in stdout and "   15" in stdout

    # The outputs exist now: refused before any work, nothing changed.
    before = out.read_bytes()
    code, _, err = run_cli(capsys, "eval", "ab", "--vector", str(vectors["rec"]), "--dataset", "sentiment",
                       "--json", str(out))
    assert "file exists" in one_error(code, err) and out.read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vector", "PLAIN", "--dataset", "sentiment", "--limit", "2"], "no recommended layer"),
        (["--vector", "REC", "--dataset", "sentiment", "--multipliers", "1,x"], "bad multipliers list '1,x'"),
        (["--vector", "REC", "--dataset", "no-such-behavior"], "unknown dataset 'no-such-behavior'"),
        (["--vector", "REC", "--dataset", "missing/file.json"], "no such dataset file"),
        (["--vector", "nowhere.gguf", "--dataset", "sentiment"], "no such vector file"),
        (["--vector", "REC", "--dataset", "sentiment", "--layers", "40", "--limit", "2"], "out of range"),
        (["--vector", "REC", "--dataset", "sentiment", "--layers", "12", "--limit", "2"], "no direction for layer 12"),
    ],
)
def test_ab_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], vectors: dict[str, Path], args: list[str], message: str
) -> None:
    args = [str(vectors[a.lower()]) if a in ("PLAIN", "REC") else a for a in args]
    code, _, err = run_cli(capsys, "eval", "ab", *args, *THREADS)
    assert message in one_error(code, err)


def test_open_ended_cli(capsys: pytest.CaptureFixture[str], vectors: dict[str, Path], tmp_path: Path) -> None:
    out, export = tmp_path / "oe.jsonl", tmp_path / "export.jsonl"
    code, stdout, err = run_cli(capsys, "eval", "open-ended", "--vector", str(vectors["rec"]), "--dataset", "sentiment",
                            "--limit", "1", "--multipliers", "0,2", "--max-tokens", "8", "--metric", "sentiment",
                            "--metric", "length", "--out", str(out), "--export", str(export), *THREADS)
    assert code == 0, err
    assert "x+0:" in stdout and "x+2:" in stdout and "distinct-2" in stdout and "ppl" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["multiplier"] for r in rows] == [0.0, 2.0]
    assert {"prompt", "multiplier", "layer", "answer", "sentiment", "length", "perplexity"} <= set(rows[0])
    exported = [json.loads(line) for line in export.read_text().splitlines()]
    assert exported[0]["behavior"] == "sentiment" and exported[0]["rubric"] in exported[0]["judge_prompt"]
    assert "numerical score" in exported[0]["judge_system"]  # the paper's judge system prompt
    code, _, err = run_cli(capsys, "eval", "open-ended", "--vector", str(vectors["rec"]), "--dataset", "sentiment",
                       "--metric", "nope")
    assert "unknown metric 'nope'" in one_error(code, err)


def test_capability_cli(capsys: pytest.CaptureFixture[str], vectors: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "tqa.json"
    code, stdout, err = run_cli(capsys, "eval", "truthfulqa", "--vector", str(vectors["rec"]), "--limit", "2",
                            "--multipliers", "0,1", "--json", str(out), *THREADS)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["dataset"] == "truthfulqa" and data["layer"] == 15
    assert [r["multiplier"] for r in data["results"]] == [0.0, 1.0] and data["results"][0]["n"] == 2
    assert "p(correct)" in stdout


def test_analyze_cosine_and_behaviors(
    capsys: pytest.CaptureFixture[str], vectors: dict[str, Path], tmp_path: Path
) -> None:
    heat = tmp_path / "cos.png"
    code, stdout, err = run_cli(capsys, "analyze", "cosine", str(vectors["rec"]), "--out", str(heat))
    assert code == 0, err
    assert "3 layers" in stdout and is_png(heat)
    matrix = tmp_path / "beh.png"
    code, stdout, err = run_cli(capsys, "analyze", "behaviors", str(vectors["rec"]), str(vectors["plain"]),
                            "--layer", "15", "--out", str(matrix))
    assert code == 0, err
    assert "sentiment" in stdout and "formality" in stdout and "1.00" in stdout and is_png(matrix)
    code, _, err = run_cli(capsys, "analyze", "behaviors", str(vectors["rec"]), str(vectors["plain"]), "--layer", "3")
    assert "no direction for layer 3" in one_error(code, err)


def test_report(capsys: pytest.CaptureFixture[str], vectors: dict[str, Path], tmp_path: Path) -> None:
    vectors_dir = tmp_path / "vectors"
    vectors_dir.mkdir()
    (vectors_dir / "sentiment.gguf").write_bytes(vectors["rec"].read_bytes())
    report = tmp_path / "report"
    code, stdout, err = run_cli(capsys, "eval", "report", "--vectors", str(vectors_dir), "--out", str(report),
                            "--limit", "2", *THREADS)
    assert code == 0, err
    text = (report / "README.md").read_text()
    assert "| sentiment | sentiment (val) | 15 |" in text and "### Layer sweep" in text
    assert is_png(report / "sentiment_layers.png") and is_png(report / "sentiment_multipliers.png")
    data = json.loads((report / "sentiment.json").read_text())
    assert [r["layer"] for r in data["layer_sweep"]["results"]] == [10] * 3 + [15] * 3 + [20] * 3
    code, _, err = run_cli(capsys, "eval", "report", "--vectors", str(vectors_dir), "--out", str(report))
    assert "file exists" in one_error(code, err)


@pytest.mark.torch
def test_analyze_pca(capsys: pytest.CaptureFixture[str], tmp_path: Path, hf_model: tuple) -> None:
    import torch

    grid = tmp_path / "pca.png"
    threads = torch.get_num_threads()
    torch.set_num_threads(int(THREADS[1]))  # spinning threads stall on a shared CPU
    try:
        code, stdout, err = run_cli(capsys, "analyze", "pca", "--dataset", "sentiment", "--layers", "2,15",
                                "--limit", "6", "--backend", "torch", "--out", str(grid))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    assert "pair accuracy" in stdout and is_png(grid)
