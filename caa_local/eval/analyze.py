"""The paper's analyses: cosine similarity of vectors across layers and behaviors, PCA of
per-example activations per layer, and steerability from saved A/B results. numpy only;
activations for the PCA come from ``caa_local.torch.extract`` (torch), imported when asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError, ModelMismatchError
from caa_local.core.layers import no_direction
from caa_local.core.vector import ControlVector


def cosine_matrix(rows: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Pairwise cosine similarity of the rows of an (n, d) array (0 where a row is all zeros)."""
    x = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return np.clip(unit @ unit.T, -1.0, 1.0)


def layer_cosines(vector: ControlVector) -> tuple[list[int], npt.NDArray[np.float64]]:
    """Layer x layer cosine similarity of one vector's directions."""
    layers = vector.layers
    return layers, cosine_matrix(np.stack([vector.directions[layer] for layer in layers]))


def behavior_cosines(
    vectors: Mapping[str, ControlVector], layer: int
) -> tuple[list[str], npt.NDArray[np.float64]]:
    """Behavior x behavior cosine similarity of several vectors at one layer."""
    if len(vectors) < 2:
        raise CaaError(f"comparing behaviors needs at least two vectors, got {len(vectors)}")
    names = list(vectors)
    sizes = {vectors[name].n_embd for name in names}
    if len(sizes) > 1:
        raise ModelMismatchError(f"the vectors have different n_embd ({sorted(sizes)}): from different models?")
    missing = [name for name in names if layer not in vectors[name].directions]
    if missing:
        raise no_direction(missing[0], layer, vectors[missing[0]].layers)
    return names, cosine_matrix(np.stack([vectors[name].directions[layer] for name in names]))


def format_matrix(names: Sequence[str], matrix: npt.NDArray[np.floating]) -> str:
    """A plain-text table of a square matrix with row and column names."""
    width = max(6, *(len(n) for n in names))
    short = [n[:6] for n in names]
    lines = [" " * width + " " + " ".join(f"{s:>6}" for s in short)]
    for name, row in zip(names, matrix):
        lines.append(f"{name:<{width}} " + " ".join(f"{v:6.2f}" for v in row))
    return "\n".join(lines)


@dataclass(frozen=True)
class Projection:
    """2-D PCA projection of one layer's points and how well the two classes separate."""

    xy: npt.NDArray[np.float64]  # (n, 2)
    explained: tuple[float, float]  # variance ratio of PC1, PC2
    separation: float  # accuracy of a nearest-centroid classifier in the 2-D projection


def pca_2d(x: npt.NDArray[np.floating], labels: npt.NDArray[np.bool_]) -> Projection:
    """Project (n, d) points onto their first two principal components (numpy SVD)."""
    x = np.asarray(x, dtype=np.float64)
    centered = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    k = min(2, vt.shape[0])
    xy = np.zeros((x.shape[0], 2))
    xy[:, :k] = centered @ vt[:k].T
    var = s**2
    total = var.sum() or 1.0
    explained = tuple(float(v / total) for v in (list(var[:2]) + [0.0, 0.0])[:2])
    labels = np.asarray(labels, dtype=bool)
    separation = float("nan")
    if labels.any() and (~labels).any():
        c1, c0 = xy[labels].mean(axis=0), xy[~labels].mean(axis=0)
        predicted = np.linalg.norm(xy - c1, axis=1) < np.linalg.norm(xy - c0, axis=1)
        separation = float((predicted == labels).mean())
    return Projection(xy, explained, separation)  # type: ignore[arg-type]


def example_activations(
    model: Any, tokenizer: Any, template: Any, items: Sequence[Any], layers: Sequence[int],
    batch_size: int = 8,
) -> dict[str, npt.NDArray[np.float32]]:
    """Per-example block outputs at the answer letter, as extraction reads them (torch):
    {"matching", "not_matching"}, each (n, len(layers), n_embd)."""
    from caa_local.torch.extract import example_activations as read

    return read(model, tokenizer, template, items, layers, batch_size)


def pca_layers(
    activations: Mapping[str, npt.NDArray[np.floating]], layers: Sequence[int]
) -> dict[int, Projection]:
    """Per layer: PCA of the 2n activations (matching first), labels True for matching."""
    pos, neg = np.asarray(activations["matching"]), np.asarray(activations["not_matching"])
    if pos.shape != neg.shape or pos.ndim != 3 or pos.shape[1] != len(layers):
        raise CaaError(f"activations: expected two (n, {len(layers)}, n_embd) arrays, got {pos.shape}, {neg.shape}")
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    return {layer: pca_2d(np.concatenate([pos[:, i], neg[:, i]]), labels) for i, layer in enumerate(layers)}


def pair_accuracy(
    pos: npt.NDArray[np.floating], neg: npt.NDArray[np.floating], groups: Sequence[str] | None = None
) -> float:
    """Held-out share of pairs the CAA direction ranks right: (pos - neg) . d > 0.

    Two folds (even / odd pairs): d is the mean difference of one fold, scored on the other.
    Unlike the 2-D PCA, this ignores variance unrelated to the behavior. ``groups`` (the
    matching letter of each pair) balances it: d averages the groups' mean differences and
    the accuracy averages the groups', so an unbalanced A/B mix cannot pass the answer
    letter (which dominates early layers) off as the behavior.
    """
    diff = np.asarray(pos, dtype=np.float64) - np.asarray(neg, dtype=np.float64)
    keys = np.asarray(groups if groups is not None else [""] * len(diff))
    scores = []
    for fold in (0, 1):
        test = np.arange(len(diff)) % 2 == fold
        means = [diff[~test & (keys == k)].mean(axis=0) for k in np.unique(keys) if (~test & (keys == k)).any()]
        if not means:
            continue
        d = np.mean(means, axis=0)
        for k in np.unique(keys[test]):
            scores.append(((diff[test & (keys == k)] @ d) > 0).mean())
    return float(np.mean(scores)) if scores else float("nan")


def steerability_table(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per layer of an ``eval ab --json`` file: steerability, anti-steerable share, p(match) range."""
    from caa_local.eval.ab import SweepResult

    result = SweepResult.from_json(dict(data))
    slopes, anti = result.steerability(), result.anti_steerable()
    rows = []
    for i, layer in enumerate(result.layers):
        means = result.p_match[i].mean(axis=-1)
        rows.append({
            "layer": layer,
            "steerability": slopes[layer],
            "anti_steerable": anti[layer],
            "p_match_min": float(means.min()),
            "p_match_max": float(means.max()),
            "n": result.n,
        })
    return rows
