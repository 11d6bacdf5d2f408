"""Cross-behavior normalization (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from caa_local.core.errors import ModelMismatchError
from caa_local.core.normalize import normalize
from caa_local.core.vector import ControlVector


def _vector(seed: int, layers: list[int], n_embd: int = 16, hint: str = "llama") -> ControlVector:
    rng = np.random.default_rng(seed)
    return ControlVector(
        hint,
        {layer: rng.normal(scale=seed + layer, size=n_embd) for layer in layers},
        {"behavior": f"b{seed}"},
    )


def test_equal_norms_per_layer_and_directions_kept() -> None:
    vectors = {"a": _vector(1, [1, 5, 9]), "b": _vector(2, [1, 5, 9]), "c": _vector(7, [1, 5, 9])}
    out = normalize(vectors)
    assert list(out) == ["a", "b", "c"]
    for layer in (1, 5, 9):
        before = [np.linalg.norm(v.directions[layer]) for v in vectors.values()]
        after = [np.linalg.norm(v.directions[layer]) for v in out.values()]
        np.testing.assert_allclose(after, np.mean(before), rtol=1e-5)
        for name in vectors:
            a, b = vectors[name].directions[layer], out[name].directions[layer]
            cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert cos == pytest.approx(1.0, abs=1e-6)
            assert out[name].directions[layer].dtype == np.float32
    meta = out["b"].metadata
    assert meta["normalization"] == "cross-behavior"
    assert meta["normalized_with"] == "a,b,c" and meta["behavior"] == "b2"


def test_single_vector_is_unchanged() -> None:
    vec = _vector(3, [2, 4])
    out = normalize({"only": vec})["only"]
    for layer in vec.layers:
        np.testing.assert_allclose(out.directions[layer], vec.directions[layer], rtol=1e-6)


def test_zero_direction_stays_zero() -> None:
    zero = ControlVector("llama", {1: np.zeros(16, np.float32)})
    out = normalize({"z": zero, "v": _vector(1, [1])})
    assert not out["z"].directions[1].any()


def test_mismatches_are_rejected() -> None:
    with pytest.raises(ModelMismatchError, match="holds layers 1-2"):
        normalize({"a": _vector(1, [1, 2, 3]), "b": _vector(2, [1, 2])})
    with pytest.raises(ModelMismatchError, match="8 values"):
        normalize({"a": _vector(1, [1]), "b": _vector(2, [1], n_embd=8)})
    with pytest.raises(ModelMismatchError, match="model_hint"):
        normalize({"a": _vector(1, [1]), "b": _vector(2, [1], hint="qwen2")})
    with pytest.raises(ModelMismatchError, match="at least one"):
        normalize({})
