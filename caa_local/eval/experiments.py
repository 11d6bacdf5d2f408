"""The paper's further experiments, each a function returning a result with its own table and JSON.

- :func:`transfer_vector`: one layer's direction applied at other layers (the paper's
  "layer-13 vector at every layer" figure); evaluate it with ``ab_sweep``.
- :func:`layer_similarity`: cosine of two vectors layer by layer (base- vs chat-model vectors).

MMLU / TruthfulQA per category live in ``caa_local.eval.capability``; the per-token view
(cosine of a vector with every token's activation, torch) in ``caa_local.torch.token_view``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from caa_local.core.errors import CaaError, ModelMismatchError
from caa_local.core.vector import ControlVector


def transfer_vector(vector: ControlVector, from_layer: int, layers: Sequence[int]) -> ControlVector:
    """A vector holding ``vector``'s layer-``from_layer`` direction at each of ``layers``."""
    if from_layer not in vector.directions:
        raise CaaError(f"--from-layer {from_layer}: the vector has no direction there (it holds {vector.layers})")
    if not layers:
        raise CaaError("no layers to apply the vector at")
    direction = vector.directions[from_layer]
    meta = {**vector.metadata, "transferred_from_layer": str(from_layer)}
    meta.pop("recommended_layer", None)
    return ControlVector(vector.model_hint, {layer: direction for layer in layers}, meta)


# -- vector similarity across layers -------------------------------------------------------------
@dataclass
class LayerSimilarity:
    """Cosine of two vectors at every layer both hold (e.g. base- vs chat-model vectors)."""

    names: tuple[str, str]
    layers: list[int]
    cosine: list[float]

    def table(self) -> str:
        lines = [f"| layer | cos({self.names[0]}, {self.names[1]}) |", "|---|---|"]
        lines += [f"| {layer} | {c:+.3f} |" for layer, c in zip(self.layers, self.cosine)]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"vectors": list(self.names), "layers": self.layers, "cosine": self.cosine}


def layer_similarity(a: ControlVector, b: ControlVector, names: tuple[str, str] = ("a", "b")) -> LayerSimilarity:
    """Per shared layer, cosine(a[L], b[L]); the two must come from models of one n_embd."""
    if a.n_embd != b.n_embd:
        raise ModelMismatchError(f"{names[0]} has n_embd {a.n_embd}, {names[1]} has {b.n_embd}: "
                                 "vectors of different models cannot be compared")
    layers = sorted(set(a.layers) & set(b.layers))
    if not layers:
        raise CaaError(f"{names[0]} and {names[1]} share no layer ({a.layers} vs {b.layers})")
    cos = []
    for layer in layers:
        x, y = a.directions[layer].astype(np.float64), b.directions[layer].astype(np.float64)
        denom = np.linalg.norm(x) * np.linalg.norm(y)
        cos.append(float(x @ y / denom) if denom > 0 else 0.0)
    return LayerSimilarity(names, layers, cos)
