"""Bad input across commands: one clear `Error:` line, a non-zero exit, no traceback, no file harmed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from caa_local.cli import main
from caa_local.core.errors import CaaError, VectorFileError
from caa_local.core.locate import default_model_path
from caa_local.core.vector import ControlVector
from conftest import write_raw_vector

pytestmark = pytest.mark.slow


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ok = np.ones(576, np.float32)
    out = {
        "good": tmp_path / "good.gguf",
        "garbage": tmp_path / "garbage.gguf",
        "nan": write_raw_vector(tmp_path / "nan.gguf", {"direction.5": np.full(576, np.nan, np.float32)}),
        "block0": write_raw_vector(tmp_path / "block0.gguf", {"direction.0": ok}),
        "f64": write_raw_vector(tmp_path / "f64.gguf", {"direction.5": ok.astype(np.float64)}),
        "bigembd": tmp_path / "bigembd.gguf",
        "beyond": tmp_path / "beyond.gguf",
        "qwen": tmp_path / "qwen.gguf",
        "nolayer": tmp_path / "nolayer.gguf",
        "text": tmp_path / "notes.txt",
        "badjson": tmp_path / "bad.json",
        "nokey": tmp_path / "nokey.json",
        "empty": tmp_path / "empty.json",
        "badletter": tmp_path / "badletter.json",
        "exists": tmp_path / "exists.gguf",
    }
    ControlVector("llama", {5: ok, 6: ok}, {"recommended_layer": "5"}).save(out["good"])
    out["garbage"].write_bytes(b"GGUF" + bytes(range(256)) * 3)
    ControlVector("llama", {5: np.ones(4096, np.float32)}).save(out["bigembd"])
    ControlVector("llama", {31: ok}).save(out["beyond"])
    ControlVector("qwen2", {5: ok}, {"recommended_layer": "5"}).save(out["qwen"])
    ControlVector("llama", {5: ok, 6: ok}).save(out["nolayer"])
    out["text"].write_text("not a model")
    out["badjson"].write_text('[{"question": "x",')
    out["nokey"].write_text(json.dumps([{"question": "Q?\n(A) y\n(B) n", "answer_matching_behavior": "(A)"}]))
    out["empty"].write_text("[]")
    out["badletter"].write_text(json.dumps([{"question": "Q?\n(A) y\n(B) n",
                                             "answer_matching_behavior": "(C)",
                                             "answer_not_matching_behavior": "(B)"}]))
    ControlVector("llama", {5: ok}).save(out["exists"])
    return out


GEN = ["generate", "hi", "--max-tokens", "2", "--threads", "1"]
# (case id, argv builder, a fragment the one error line must contain)
CASES: list[tuple[str, Callable[[dict[str, Path]], list[str]], str]] = [
    ("missing vector file", lambda f: ["vector", "info", str(f["good"].parent / "nope.gguf")], "no such vector file"),
    ("garbage vector", lambda f: ["vector", "info", str(f["garbage"])], "garbage.gguf"),
    ("model file as vector", lambda f: ["vector", "info", str(default_model_path())], "is this a model file"),
    ("NaN vector", lambda f: ["vector", "info", str(f["nan"])], "NaN"),
    ("direction.0", lambda f: ["vector", "info", str(f["block0"])], "block 0"),
    ("float64 tensor", lambda f: ["vector", "info", str(f["f64"])], "F32"),
    ("unknown shipped name", lambda f: ["vector", "info", "no-such-behavior"], "no vector named"),
    ("combine bad scale", lambda f: ["vector", "combine", f"{f['good']}:abc", "-o", str(f["good"].parent / "o.gguf")], "not a number"),
    ("combine n_embd mismatch", lambda f: ["vector", "combine", str(f["good"]), str(f["bigembd"]), "-o", str(f["good"].parent / "o.gguf")], "n_embd"),
    ("combine onto existing file", lambda f: ["vector", "combine", str(f["good"]), "-o", str(f["exists"])], "file exists"),
    ("missing model", lambda f: [*GEN, "--model", str(f["good"].parent / "none.gguf")], "no such model file"),
    ("text file as model", lambda f: [*GEN, "--model", str(f["text"])], "not a GGUF file"),
    ("vector from a bigger model", lambda f: [*GEN, "--vector", str(f["bigembd"])], "n_embd is 576"),
    ("layer beyond the model", lambda f: [*GEN, "--vector", str(f["beyond"])], "direction.31"),
    ("vector for another architecture", lambda f: [*GEN, "--vector", str(f["qwen"])], "--any-arch"),
    ("layer 0", lambda f: [*GEN, "--vector", str(f["good"]), "--layers", "0"], "block 0"),
    ("layer 30", lambda f: [*GEN, "--vector", str(f["good"]), "--layers", "30"], "valid: 1..29"),
    ("bad layer spec", lambda f: [*GEN, "--vector", str(f["good"]), "--layers", "5-x"], "layer spec"),
    ("negative threads", lambda f: [*GEN[:-2], "--threads", "-2"], "threads"),
    ("NaN multiplier", lambda f: [*GEN, "--vector", f"{f['good']}:nan"], "finite"),
    ("zero max tokens", lambda f: ["generate", "hi", "--max-tokens", "0"], "max-tokens"),
    ("tiny context", lambda f: ["generate", "hi", "--ctx", "8"], "--ctx"),
    ("malformed dataset JSON", lambda f: ["extract", str(f["badjson"]), "-o", str(f["good"].parent / "x.gguf")], "bad.json"),
    ("dataset missing key", lambda f: ["extract", str(f["nokey"]), "-o", str(f["good"].parent / "x.gguf")], "answer_not_matching_behavior"),
    ("empty dataset", lambda f: ["extract", str(f["empty"]), "-o", str(f["good"].parent / "x.gguf")], "empty"),
    ("letter not in question", lambda f: ["extract", str(f["badletter"]), "-o", str(f["good"].parent / "x.gguf")], "(C)"),
    ("unknown behavior", lambda f: ["extract", "no-such-behavior"], "no-such-behavior"),
    ("extract onto existing file", lambda f: ["extract", "sentiment", "-o", str(f["exists"])], "file exists"),
    ("normalize one file", lambda f: ["normalize", str(f["good"]), "--out-dir", str(f["good"].parent / "n")], "at least two"),
    ("eval bad multipliers", lambda f: ["eval", "ab", "--vector", str(f["good"]), "--dataset", "sentiment", "--multipliers", "1,x", "--limit", "2"], "x"),
    ("eval without a layer", lambda f: ["eval", "ab", "--vector", str(f["nolayer"]), "--dataset", "sentiment", "--limit", "2"], "--layers"),
    ("eval missing dataset", lambda f: ["eval", "ab", "--vector", str(f["good"]), "--dataset", str(f["text"].parent / "none.json"), "--limit", "2"], "none.json"),
    ("vector spec with a bad scale", lambda f: [*GEN, "--vector", f"{f['good']}:x2"], "not a number"),
    ("combine infinite scale", lambda f: ["vector", "combine", f"{f['good']}:inf", "-o", str(f["good"].parent / "o.gguf")], "finite"),
    ("threads not a number", lambda f: [*GEN[:-2], "--threads", "many"], "--threads"),
    ("max tokens not a number", lambda f: ["generate", "hi", "--max-tokens", "lots"], "--max-tokens"),
    ("eval NaN multiplier", lambda f: ["eval", "ab", "--vector", str(f["good"]), "--dataset", "sentiment", "--multipliers", "0,nan", "--limit", "2"], "finite"),
    ("eval repeated multiplier", lambda f: ["eval", "ab", "--vector", str(f["good"]), "--dataset", "sentiment", "--multipliers", "1,1", "--limit", "2"], "repeat"),
    ("open-ended zero max tokens", lambda f: ["eval", "open-ended", "--vector", str(f["good"]), "--dataset", "sentiment", "--max-tokens", "0"], "--max-tokens"),
]


@pytest.mark.parametrize("case_id,argv,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_error(
    case_id: str, argv: Callable[[dict[str, Path]], list[str]], fragment: str,
    files: dict[str, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    before = {p: p.read_bytes() for p in files.values() if p.exists()}
    with pytest.raises(SystemExit) as exit_info:
        main(argv(files))
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("Error")]
    assert len(error_lines) == 1, err
    assert fragment in error_lines[0], err
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in before} == before  # nothing overwritten or half-written
    assert not list(files["good"].parent.glob(".*.tmp"))


def test_debug_shows_the_traceback(files: dict[str, Path]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "caa_local.cli", "--debug", "vector", "info", str(files["nan"])],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and "Traceback" in result.stderr and "VectorFileError" in result.stderr


# -- warnings: the command still runs ----------------------------------------------------------
def run_cli(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_absurd_multiplier_and_long_context_warn(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, [*GEN[:2], "--max-tokens", "1", "--threads", "1", "--ctx", "8448",
                                      "--vector", f"{files['good']}:80"])
    assert code == 0 and "Traceback" not in err, err
    assert "Warning: multiplier +80 is far outside the usual range" in err
    assert "Warning: --ctx 8448 is beyond the 8192 tokens" in err
    assert out.strip()  # it still answered
    code, _, err = run_cli(capsys, ["eval", "ab", "--vector", str(files["good"]), "--dataset", "sentiment",
                                    "--multipliers", "0,-60", "--limit", "1", "--threads", "1"])
    assert code == 0 and "Warning: multiplier -60" in err, err


def test_max_tokens_beyond_the_context_is_clamped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "answer.json"
    code, _, err = run_cli(capsys, ["generate", "Write a very long story about a dragon.", "--ctx", "256",
                                    "--max-tokens", "100000000000", "--temperature", "0", "--threads", "1",
                                    "--json", str(out_path)])
    assert code == 0 and "Traceback" not in err, err
    assert "Warning: --max-tokens 100000000000 is larger than the context of 256 tokens; using 256" in err
    data = json.loads(out_path.read_text())
    assert data["stop_reason"] in ("eog", "context")
    if data["stop_reason"] == "context":
        assert "Note: the answer stopped when the context of 256 tokens filled" in err


# -- CliRunner: the same one-line errors without cli.main ------------------------------------
def test_cli_runner_gets_one_error_line(files: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from caa_local.cli import cli

    for argv, fragment in (
        (["vector", "info", str(files["nan"])], "NaN"),
        (["eval", "ab", "--vector", str(files["nolayer"]), "--dataset", "sentiment", "--limit", "2"], "--layers"),
    ):
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and fragment in lines[0], result.stderr
        assert "Traceback" not in result.output
        assert not isinstance(result.exception, CaaError)  # handled, not escaped


def test_cli_runner_debug_keeps_the_exception(files: dict[str, Path]) -> None:
    from click.testing import CliRunner

    from caa_local.cli import cli

    result = CliRunner().invoke(cli, ["--debug", "vector", "info", str(files["nan"])])
    assert result.exit_code == 1
    assert isinstance(result.exception, VectorFileError)
    assert "Error:" not in result.stderr


def test_flash_attn_is_a_choice_every_engine_command_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--flash-attn on/off/auto reaches the engine (tests/test_scoring_oracle.py checks the numbers);
    anything else is a usage error, and bench, which measures llama.cpp's default, refuses a choice."""
    for choice in ("on", "off"):
        out_path = tmp_path / f"{choice}.json"
        code, _, err = run_cli(capsys, ["generate", "Say hello.", "--flash-attn", choice, "--temperature", "0",
                                        "--max-tokens", "4", "--threads", "1", "--json", str(out_path)])
        assert code == 0 and "Traceback" not in err, err
        assert json.loads(out_path.read_text())["text"]
    code, _, err = run_cli(capsys, ["generate", "Say hello.", "--flash-attn", "sideways"])
    assert code == 2 and "'sideways' is not one of 'auto', 'on', 'off'" in err, err
    code, _, err = run_cli(capsys, ["bench", "--flash-attn", "off", "--quick"])
    assert code == 1 and "--flash-attn is not supported here" in err and "Traceback" not in err, err
