"""Bad input across commands: one clear `Error:` line, a non-zero exit, no traceback, no file harmed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest

from caa_local.cli import main
from caa_local.models import default_model_path
from caa_local.vector import ControlVector


def raw_vector(path: Path, tensors: dict[str, np.ndarray], arch: str = "controlvector") -> Path:
    """A GGUF written without ControlVector's validation, to hand the CLI hostile files."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_string("controlvector.model_hint", "llama")
    writer.add_uint32("controlvector.layer_count", len(tensors))
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    ok = np.ones(576, np.float32)
    out = {
        "good": tmp_path / "good.gguf",
        "garbage": tmp_path / "garbage.gguf",
        "nan": raw_vector(tmp_path / "nan.gguf", {"direction.5": np.full(576, np.nan, np.float32)}),
        "block0": raw_vector(tmp_path / "block0.gguf", {"direction.0": ok}),
        "f64": raw_vector(tmp_path / "f64.gguf", {"direction.5": ok.astype(np.float64)}),
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
    ("vector for another architecture", lambda f: [*GEN, "--vector", str(f["qwen"])], "--force"),
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
