"""Making and calibrating a condition vector from prompt reads (both backends share this).

Reads are block outputs averaged over each prompt's user message: arrays (n_prompts,
n_layers, n_embd), rows in ``layers`` order. ``fit`` finds the direction on the train prompts
with both of CAST's methods and keeps the one whose best layer separates the val prompts
better (threshold chosen on train, F1 measured on val). ``calibrate`` is CAST's grid search:
the layer, threshold and comparison with the best F1 on the val prompts, and the confusion
matrices on val (where it was chosen) and test (never seen before).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from caa_local.core.condition import (
    KEY_CALIBRATION,
    KEY_COMPARISON,
    KEY_LAYER,
    KEY_THRESHOLD,
    KIND,
    METHODS,
    best_point,
    cast_score,
    confusion,
    directions,
    fires,
    require_condition,
)
from caa_local.core.errors import CaaError
from caa_local.core.layers import format_layers
from caa_local.core.vector import ControlVector

Reads = npt.NDArray[np.float32]


def candidate_layers(n_layer: int) -> list[int]:
    """Layers a condition can be read at: 1 .. n_layer - 2 (the last block keeps only output rows)."""
    return list(range(1, n_layer - 1))


def check_layers(layers: Sequence[int], n_layer: int) -> list[int]:
    allowed = candidate_layers(n_layer)
    bad = [layer for layer in layers if layer not in allowed]
    if bad:
        raise CaaError(f"condition layer {bad[0]} is out of range for this model (valid: 1..{n_layer - 2})")
    if not layers:
        raise CaaError("no condition layers given")
    return list(dict.fromkeys(layers))


def scores(reads: Reads, dirs: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    """CAST scores (n_prompts, n_layers) of reads under per-layer directions (n_layers, n_embd)."""
    return np.stack([cast_score(reads[:, i], dirs[i]) for i in range(dirs.shape[0])], axis=1)


def separation(matching: npt.ArrayLike, not_matching: npt.ArrayLike) -> float:
    """|difference of the means| / pooled standard deviation (d') of two sides' scores."""
    a, b = np.asarray(matching, dtype=np.float64), np.asarray(not_matching, dtype=np.float64)
    spread = np.sqrt((a.var() + b.var()) / 2)
    return float(abs(a.mean() - b.mean()) / spread) if spread > 0 else math.inf


def _held_out_f1(train: tuple[Reads, Reads], val: tuple[Reads, Reads], dirs: npt.NDArray[np.float32]) -> list[float]:
    """Per layer: F1 on val with the threshold and comparison chosen on train."""
    tp, tn = scores(train[0], dirs), scores(train[1], dirs)
    vp, vn = scores(val[0], dirs), scores(val[1], dirs)
    out = []
    for i in range(dirs.shape[0]):
        threshold, comparison, _ = best_point(tp[:, i], tn[:, i])
        out.append(confusion(fires(vp[:, i], threshold, comparison), fires(vn[:, i], threshold, comparison))["f1"])
    return out


def fit(train: tuple[Reads, Reads], val: tuple[Reads, Reads], layers: Sequence[int], model_hint: str,
        metadata: dict[str, str]) -> ControlVector:
    """The condition vector: directions from train by the method that does better on val."""
    results: dict[str, tuple[npt.NDArray[np.float32], list[float]]] = {}
    for method in METHODS:
        dirs = directions(train[0], train[1], method)
        results[method] = (dirs, _held_out_f1(train, val, dirs))
    # Ties go to PCA, CAST's method.
    method = max(METHODS, key=lambda m: (max(results[m][1]), m == "pca"))
    dirs = results[method][0]
    comparison = {m: {"best_val_f1": max(f1s), "best_layer": layers[int(np.argmax(f1s))]}
                  for m, (_, f1s) in results.items()}
    meta = {**metadata, "kind": KIND, "method": method, "method_comparison": json.dumps(comparison, separators=(",", ":")),
            "layers": format_layers(layers), "normalization": "unit", "score": "cos(h, tanh(P h)) over the user message",
            "n_matching": str(len(train[0])), "n_not_matching": str(len(train[1]))}
    return ControlVector(model_hint, {layer: dirs[i] for i, layer in enumerate(layers)}, meta)


def calibrate(vector: ControlVector, val: tuple[Reads, Reads], test: tuple[Reads, Reads],
              layers: Sequence[int]) -> tuple[ControlVector, dict[str, Any]]:
    """CAST's grid search on val over ``layers`` (reads in that order); the calibrated vector and
    its summary (val and test confusion matrices at the chosen point)."""
    require_condition("vector", vector)
    dirs = np.stack([vector.directions[layer] for layer in layers])
    vp, vn = scores(val[0], dirs), scores(val[1], dirs)
    per_layer = []
    for i, layer in enumerate(layers):
        threshold, comparison, result = best_point(vp[:, i], vn[:, i])
        per_layer.append({"layer": layer, "threshold": threshold, "comparison": comparison, "f1": result["f1"],
                          "separation": separation(vp[:, i], vn[:, i])})
    # Several layers often reach the same F1 on a few dozen prompts; the widest gap between the
    # two sides (in their spread) generalizes best. Measured on the work condition: 14 layers
    # had val F1 1.0, test F1 0.889-1.0; the widest separation (layer 13, d' 5.5) gave 0.984.
    best = max(range(len(layers)), key=lambda i: (per_layer[i]["f1"], per_layer[i]["separation"]))
    point = per_layer[best]
    tp, tn = (cast_score(side[:, best], dirs[best]) for side in test)
    summary = {
        "layer": point["layer"], "threshold": point["threshold"], "comparison": point["comparison"],
        "val": confusion(fires(vp[:, best], point["threshold"], point["comparison"]),
                         fires(vn[:, best], point["threshold"], point["comparison"])),
        "test": confusion(fires(tp, point["threshold"], point["comparison"]),
                          fires(tn, point["threshold"], point["comparison"])),
        "n_val": [len(val[0]), len(val[1])], "n_test": [len(test[0]), len(test[1])],
        "per_layer_val_f1": {str(p["layer"]): p["f1"] for p in per_layer},
        "separation": round(point["separation"], 3),
    }
    calibrated = vector.with_metadata(**{
        KEY_LAYER: point["layer"], KEY_THRESHOLD: repr(point["threshold"]), KEY_COMPARISON: point["comparison"],
        KEY_CALIBRATION: json.dumps(summary, separators=(",", ":")),
    })
    return calibrated, summary


def card_lines(name: str, summary: dict[str, Any]) -> list[str]:
    sign = ">" if summary["comparison"] == "above" else "<"
    lines = [f"{name}: fires when score {sign} {summary['threshold']:.5g} at layer {summary['layer']}"]
    for part in ("val", "test"):
        c = summary[part]
        lines.append(f"  {part:4}  F1 {c['f1']:.3f}  precision {c['precision']:.3f}  recall {c['recall']:.3f}  "
                     f"(tp {c['tp']}, fp {c['fp']}, fn {c['fn']}, tn {c['tn']})")
    return lines
