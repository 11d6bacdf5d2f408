"""`extract --backend native`: CAA extraction on the GGUF through llama.cpp (engine/reads.py).

On the default model: the native vectors equal the torch reference's (same GGUF, same pairs)
at every layer, pick the same best A/B layer, and batched reads equal reads one pair at a
time and an independent per-prompt decode. Bad input gets one clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from caa_local.core.datasets import ABItem, load_ab, split
from caa_local.core.errors import CaaError
from caa_local.core.extraction import encode_pairs
from caa_local.core.locate import file_sha256
from caa_local.engine import reads
from caa_local.engine.engine import Engine
from caa_local.engine.model import Model
from conftest import run_cli

pytestmark = pytest.mark.slow

PAPER = ("coordinate-other-ais", "corrigible-neutral-HHH", "hallucination", "myopic-reward",
         "survival-instinct", "sycophancy", "refusal")


def _mixed(n: int) -> list[ABItem]:
    """The first training pairs of each of the paper's behaviours in turn (mixed lengths)."""
    per = -(-n // len(PAPER))
    data = [split(load_ab(b).items, "train")[:per] for b in PAPER]
    return [d[i] for i in range(per) for d in data][:n]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def engine(model: Model) -> Engine:
    return model.context(n_ctx=64, n_threads=2)


# -- batching ------------------------------------------------------------------------------------
@pytest.mark.parametrize("read", ["answer-letter", "answer-text"])
def test_batched_reads_equal_one_pair_at_a_time(engine: Engine, read: str) -> None:
    items = _mixed(3) if read == "answer-letter" else split(load_ab("sentiment").items, "train")[:3]
    layers = [1, 9, engine.n_layer - 1]  # the last block keeps only output rows in llama.cpp
    batched = reads.example_activations(engine, items, layers, batch_size=3, read=read)
    single = reads.example_activations(engine, items, layers, batch_size=1, read=read)
    for key in ("matching", "not_matching"):
        scale = np.abs(single[key]).max()
        np.testing.assert_allclose(batched[key], single[key], rtol=0, atol=1e-4 * scale)
    # An independent path: the prompt decoded whole in a fresh context (Session.layer_outputs),
    # at each read position. Its batch shapes differ, so llama.cpp's quantized matmuls round
    # differently: close, not equal.
    p = encode_pairs(engine.tokenize, engine.template, items, read)[0]
    for k, key in enumerate(("matching", "not_matching")):
        seq, n = p.seqs[k], p.n_read[k]
        ref = np.mean([engine.layer_outputs(seq[: q + 1], q + 1)[layers] for q in range(len(seq) - n, len(seq))],
                      axis=0)
        assert _cos(batched[key][p.index], ref).min() > 0.995


def test_answer_mean_is_half_the_letter_where_the_parenthesis_is_its_own_token(engine: Engine) -> None:
    # "(" is shared by both prompts of a pair and read once, in the pair's shared part.
    items, layers = _mixed(2), [5, 20]
    letter = reads.extract(engine, items, layers=layers)
    mean = reads.extract(engine, items, layers=layers, read="answer-mean")
    for layer in layers:
        np.testing.assert_allclose(mean.directions[layer], 0.5 * letter.directions[layer], rtol=0,
                                   atol=1e-4 * np.abs(letter.directions[layer]).max())


# -- parity with the torch reference -------------------------------------------------------------
@pytest.mark.torch
def test_native_vectors_match_torch_at_every_layer(engine: Engine, hf_model: tuple[Any, Any, Any]) -> None:
    from caa_local.torch.extract import extract

    model, tokenizer, template = hf_model
    items = _mixed(16)
    native = reads.extract(engine, items)
    ref = extract(model, tokenizer, template, items, progress=False)
    assert native.layers == ref.layers == list(range(1, engine.n_layer))
    cos = np.array([_cos(native.directions[L], ref.directions[L]) for L in native.layers])
    ratio = np.array([np.linalg.norm(native.directions[L]) / np.linalg.norm(ref.directions[L])
                      for L in native.layers])
    print(f"native vs torch, {len(items)} pairs: cosine min {cos.min():.4f} median {np.median(cos):.4f}; "
          f"norm ratio {ratio.min():.3f}..{ratio.max():.3f}")
    assert cos.min() >= 0.99, dict(zip(native.layers, cos.round(4)))
    assert np.abs(ratio - 1).max() <= 0.05, dict(zip(native.layers, ratio.round(3)))
    meta, ref_meta = native.metadata, ref.metadata
    for key in ("n_pairs", "read_position", "layers", "normalization"):
        assert meta[key] == ref_meta[key], key
    assert (meta["backend"], meta["quantization"]) == ("native", "Q4_1")
    assert (meta["model"], meta["model_sha256"]) == (engine.model_path.name, file_sha256(engine.model_path))
    assert ref_meta["backend"] == "torch" and ref_meta["quantization"] == "float32"


@pytest.mark.torch
def test_best_ab_layer_on_validation_is_the_same(engine: Engine, hf_model: tuple[Any, Any, Any]) -> None:
    from caa_local.eval.ab import ab_sweep
    from caa_local.eval.report import best_layer
    from caa_local.torch.extract import extract

    model, tokenizer, template = hf_model
    data = load_ab("enthusiasm")  # a demo behavior the default model carries (vectors/README.md)
    train, val = split(data.items, "train")[:16], split(data.items, "val")[:6]
    layers = list(range(2, engine.n_layer, 4))
    native = reads.extract(engine, train, layers=layers, read="answer-text")
    ref = extract(model, tokenizer, template, train, layers=layers, read="answer-text", progress=False)
    best = [best_layer(ab_sweep(engine, v, val, layers, [-1.0, 1.0])) for v in (native, ref)]
    print(f"best A/B layer on validation (layers {layers}): native {best[0]}, torch {best[1]}")
    assert best[0] == best[1], best


def test_quantization_names() -> None:
    from caa_local.core.extraction import gguf_quantization, quantization_name
    from caa_local.core.locate import default_model_path

    assert (quantization_name(3), quantization_name("7"), quantization_name(15)) == ("Q4_1", "Q8_0", "Q4_K_M")
    assert quantization_name("") == "unknown" and gguf_quantization(default_model_path()) == "Q4_1"


# -- bad input -----------------------------------------------------------------------------------
def test_no_pairs_is_one_clear_error(engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CaaError, match="at least one A/B pair"):
        reads.extract(engine, [])
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    out = tmp_path / "v.gguf"
    code, stdout, err = run_cli(capsys, "extract", str(empty), "--backend", "native", "--out", str(out))
    assert code == 1 and "Error:" in err and "empty" in err and "Traceback" not in err + stdout
    assert not out.exists()


def test_native_backend_needs_a_gguf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model", encoding="utf-8")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}", encoding="utf-8")
    cases = [(str(fake), "not a GGUF file"), (str(hf_dir), "needs a .gguf file, this is a directory"),
             ("org/model", "needs a .gguf file")]
    for model, message in cases:
        out = tmp_path / "v.gguf"
        code, stdout, err = run_cli(capsys, "extract", "sentiment", "--limit", "2", "--model", model,
                                    "--backend", "native", "--out", str(out))
        assert code == 1 and message in err, (model, err)
        assert err.count("Error:") == 1 and "Traceback" not in err + stdout
        assert not out.exists()
    code, _, err = run_cli(capsys, "extract", "sentiment", "--backend", "native", "--dtype", "bfloat16",
                           "--out", str(tmp_path / "v.gguf"))
    assert code == 1 and "--dtype applies to --backend torch" in err


def test_cli_native_extraction_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "v.gguf"
    script = (
        "import sys\n"
        "from caa_local.cli import main\n"
        f"try:\n    main(['extract', 'sentiment', '--limit', '2', '--layers', '5,6', '--threads', '2', "
        f"'--out', {str(out)!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "backend: native" in proc.stderr
    from caa_local.core.vector import ControlVector

    vector = ControlVector.load(out)
    assert vector.layers == [5, 6] and vector.metadata["backend"] == "native"


def test_analyze_pca_runs_native(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    grid = tmp_path / "pca.png"
    code, stdout, err = run_cli(capsys, "analyze", "pca", "--dataset", "sentiment", "--layers", "2,15",
                                "--limit", "6", "--threads", "2", "--out", str(grid))
    assert code == 0, err
    assert "(native)" in stdout and "pair accuracy" in stdout
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
