"""The paper's experiments through the real CLI on the default model (few questions: shared CPU)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from caa_local.core.datasets import load_protocol
from caa_local.core.vector import ControlVector
from caa_local.eval.paper import expected_files
from conftest import is_png, one_error, run_cli

THREADS = ["--threads", os.environ.get("CAA_TEST_THREADS", "1")]
pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def vector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A strong random sycophancy vector at layers 10 and 15 (recommended 15)."""
    rng = np.random.default_rng(1)
    directions = {}
    for layer in (10, 15):
        v = rng.standard_normal(576)
        directions[layer] = (v / np.linalg.norm(v) * 40).astype(np.float32)
    path = tmp_path_factory.mktemp("v") / "syc.gguf"
    ControlVector("llama", directions, {"behavior": "sycophancy", "recommended_layer": "15"}).save(path)
    return path


def test_ab_defaults_to_the_test_set_and_records_it(capsys: pytest.CaptureFixture[str], vector: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    code, stdout, err = run_cli(capsys, "eval", "ab", "--vector", str(vector), "--limit", "3",
                                "--multipliers", "-1,0,1", "--json", str(out), *THREADS)
    assert code == 0, err
    assert stdout.startswith("sycophancy (test, n=3)")
    data = json.loads(out.read_text())
    assert (data["dataset"], data["split"], data["n"]) == ("sycophancy", "test", 3)
    assert data["dataset_path"].endswith("test_dataset_ab.json")


def test_system_prompts_by_name(capsys: pytest.CaptureFixture[str], vector: Path, tmp_path: Path) -> None:
    pos = load_protocol()["system_prompts"]["sycophancy"]["pos"]
    out = tmp_path / "pos.json"
    code, stdout, err = run_cli(capsys, "eval", "ab", "--vector", str(vector), "--limit", "2", "--system", "pos",
                                "--multipliers", "0", "--json", str(out), *THREADS)
    assert code == 0, err
    assert pos in stdout and json.loads(out.read_text())["system"] == "pos"
    table = tmp_path / "table.json"
    code, stdout, err = run_cli(capsys, "eval", "system-prompts", "--vector", str(vector), "--limit", "2",
                                "--multipliers", "-1,0,1", "--json", str(table), *THREADS)
    assert code == 0, err
    data = json.loads(table.read_text())
    assert set(data["p_match"]) == {"none", "pos", "neg"} and data["system_prompts"]["pos"] == pos
    assert all(len(v) == 3 for v in data["p_match"].values()) and "| pos |" in stdout
    # The pos prompt's unsteered p(match) differs from no prompt: the prompt reached the model.
    assert data["p_match"]["pos"][1] != data["p_match"]["none"][1]


def test_from_layer_applies_one_direction_at_every_layer(capsys: pytest.CaptureFixture[str], vector: Path,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "transfer.json"
    code, stdout, err = run_cli(capsys, "eval", "ab", "--vector", str(vector), "--limit", "2", "--from-layer", "15",
                                "--layers", "5,10,15,20", "--multipliers", "-1,1", "--json", str(out), *THREADS)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert sorted({r["layer"] for r in data["results"]}) == [5, 10, 15, 20] and data["from_layer"] == 15
    code, _, err = run_cli(capsys, "eval", "ab", "--vector", str(vector), "--from-layer", "3", "--layers", "all",
                           *THREADS)
    assert "--from-layer 3: the vector has no direction there" in one_error(code, err)


def test_formats_and_missing_templates(capsys: pytest.CaptureFixture[str], vector: Path) -> None:
    code, stdout, err = run_cli(capsys, "eval", "ab", "--vector", str(vector), "--limit", "2", "--format", "base",
                                "--multipliers", "0", *THREADS)
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", "ab", "--vector", str(vector), "--chat-template", "nope", *THREADS)
    assert "--chat-template 'nope': not a file nor a known name" in one_error(code, err)


def test_capability_by_category(capsys: pytest.CaptureFixture[str], vector: Path, tmp_path: Path) -> None:
    out = tmp_path / "mmlu.json"
    code, stdout, err = run_cli(capsys, "eval", "truthfulqa", "--vector", str(vector), "--limit", "1",
                                "--by-category", "--multipliers", "0,1", "--json", str(out), *THREADS)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["n"] == len(data["by_category"]) > 10  # one question per category
    assert all(len(v) == 2 for v in data["by_category"].values()) and "| **all** |" in stdout


def test_layer_similarity_cli(capsys: pytest.CaptureFixture[str], vector: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    v = ControlVector.load(vector)
    flipped = ControlVector("llama", {10: v.directions[10], 15: -v.directions[15]}, {"behavior": "base"})
    flipped.save(other)
    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    code, stdout, err = run_cli(capsys, "analyze", "behaviors", str(vector), str(other), "--layers", "all",
                                "--json", str(out), "--out", str(png))
    assert code == 0, err
    pair = json.loads(out.read_text())["pairs"][0]
    assert pair["layers"] == [10, 15] and np.allclose(pair["cosine"], [1.0, -1.0], atol=1e-6) and is_png(png)


def test_paper_report_writes_every_named_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "paper"
    behaviors = ["sycophancy", "survival-instinct"]
    code, stdout, err = run_cli(capsys, "eval", "report", "--paper", "--behaviors", ",".join(behaviors),
                                "--limit", "1", "--capability-limit", "0", "--out", str(out), *THREADS)
    assert code == 0, err
    for name in expected_files(behaviors, judged=False, has_base=False, has_torch=False):
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert is_png(out / name)
    text = (out / "README.md").read_text()
    assert "| sycophancy |" in text and "0.64 | 0.76 | 0.81" in text  # the paper's numbers beside ours
    results = json.loads((out / "results.json").read_text())
    assert results["behaviors"]["sycophancy"]["test"]["split"] == "test"
    assert results["behaviors"]["sycophancy"]["layer_sweep"]["split"] == "val"
    exported = [json.loads(line) for line in (out / "sycophancy_open_ended_export.jsonl").read_text().splitlines()]
    assert exported and exported[0]["judge_system"] == load_protocol()["judge"]["system"]


def test_open_ended_protocols(capsys: pytest.CaptureFixture[str], vector: Path) -> None:
    """The paper's protocol (no repetition penalty) by default for its behaviors; demo on request."""
    args = ["eval", "open-ended", "--vector", str(vector), "--dataset", "sycophancy", "--limit", "1",
            "--multipliers", "0", "--no-perplexity", *THREADS]
    code, stdout, err = run_cli(capsys, *args, "--max-tokens", "3")
    assert code == 0, err
    assert "3 tokens, repeat penalty 1\n" in stdout
    code, stdout, err = run_cli(capsys, *args, "--protocol", "demo", "--max-tokens", "3")
    assert code == 0, err
    assert "3 tokens, repeat penalty 1.1\n" in stdout
    code, _, err = run_cli(capsys, *args, "--repeat-penalty", "0")
    assert code == 2 and "--repeat-penalty" in err  # click's own usage error


@pytest.mark.torch
def test_analyze_tokens(capsys: pytest.CaptureFixture[str], vector: Path, tmp_path: Path,
                        hf_model: tuple) -> None:
    """Per-token cosine: one value per token of the templated prompt + answer, steered-from marked."""
    import torch

    out, png = tmp_path / "tokens.json", tmp_path / "tokens.png"
    threads = torch.get_num_threads()
    torch.set_num_threads(int(THREADS[1]))
    try:
        code, stdout, err = run_cli(capsys, "analyze", "tokens", "Is the sky green?", "--vector", str(vector),
                                    "--answer", "(A", "--json", str(out), "--out", str(png))
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err
    data = json.loads(out.read_text())
    assert data["layer"] == 15 and len(data["tokens"]) == len(data["cosine"]) > 5
    assert data["tokens"][-1] == "A" and 0 < data["steer_from"] < len(data["tokens"]) - 1
    assert all(-1.0 <= c <= 1.0 for c in data["cosine"]) and is_png(png)
