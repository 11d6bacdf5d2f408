"""The paper's cross-behavior normalization (numpy only).

At each layer, every behavior's vector is rescaled to the mean norm of all behaviors'
vectors at that layer, so one multiplier means the same strength across behaviors.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from caa_local.core.errors import ModelMismatchError
from caa_local.core.layers import format_layers
from caa_local.core.vector import ControlVector


def normalize(vectors: Mapping[str, ControlVector]) -> dict[str, ControlVector]:
    """Rescale each behavior's vector, per layer, to the layers' mean norm across behaviors.

    Every vector must hold the same layers, n_embd and model_hint. A zero direction stays zero.
    """
    if not vectors:
        raise ModelMismatchError("normalize needs at least one vector")
    names = list(vectors)
    first = vectors[names[0]]
    for name in names[1:]:
        vec = vectors[name]
        if vec.model_hint != first.model_hint:
            raise ModelMismatchError(
                f"{name}: model_hint is {vec.model_hint!r}, {names[0]} has {first.model_hint!r}"
            )
        if vec.n_embd != first.n_embd:
            raise ModelMismatchError(
                f"{name}: directions have {vec.n_embd} values, {names[0]} has {first.n_embd} "
                "(vectors from different models?)"
            )
        if set(vec.layers) != set(first.layers):
            raise ModelMismatchError(
                f"{name}: holds layers {format_layers(vec.layers)}, "
                f"{names[0]} holds {format_layers(first.layers)} (extract the same layers)"
            )
    target = {
        layer: np.mean([np.linalg.norm(vectors[n].directions[layer].astype(np.float64)) for n in names])
        for layer in first.layers
    }
    behaviors = ",".join(names)
    out: dict[str, ControlVector] = {}
    for name in names:
        vec = vectors[name]
        scaled = {}
        for layer, direction in vec.directions.items():
            d = direction.astype(np.float64)
            norm = np.linalg.norm(d)
            scaled[layer] = (d * (target[layer] / norm) if norm > 0 else d).astype(np.float32)
        out[name] = ControlVector(
            vec.model_hint,
            scaled,
            {**_rescaled_metadata(vec, target), "normalization": "cross-behavior", "normalized_with": behaviors},
        )
    return out


def _rescaled_metadata(vec: ControlVector, target: Mapping[int, float]) -> dict[str, str]:
    """A calibrated multiplier holds at its layer after rescaling by that layer's factor.

    Without a recommended layer the layers' factors differ, and the calibration is dropped.
    """
    layer = vec.recommended_layer()
    norm = float(np.linalg.norm(vec.directions[layer].astype(np.float64))) if layer in vec.directions else 0.0
    if layer is None or norm == 0.0:
        return vec.rescaled_metadata(0.0)
    return vec.rescaled_metadata(float(target[layer]) / norm)
