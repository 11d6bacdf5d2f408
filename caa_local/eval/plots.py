"""Figures of the paper's evaluations, as PNG files written atomically.

matplotlib is imported only here and only when a plot is drawn; figures are built with
``matplotlib.figure.Figure`` (the Agg canvas, no pyplot, no display, no global state).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from caa_local.core.atomic import atomic_path

if TYPE_CHECKING:
    from caa_local.eval.ab import SweepResult

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save(fig: Any, path: Path, force: bool = False, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically (refusing to overwrite without force)."""
    with atomic_path(Path(path), force) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def _title(result: SweepResult, what: str) -> str:
    vector = Path(str(result.info.get("vector", ""))).stem
    dataset = str(result.info.get("dataset", ""))
    subject = " on ".join(part for part in (vector, dataset) if part)
    return f"{what}: {subject} (n={result.n})" if subject else f"{what} (n={result.n})"


def p_match_vs_multiplier(result: SweepResult, path: Path, force: bool = False) -> Path:
    """p(match) against the multiplier, one line per layer (the paper's Figure 6 kind)."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    cmap = _cmap("viridis")
    for i, layer in enumerate(result.layers):
        color = cmap(i / max(len(result.layers) - 1, 1))
        ax.plot(result.multipliers, result.p_match[i].mean(axis=-1), "o-", color=color, label=f"layer {layer}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("multiplier")
    ax.set_ylabel("p(answer matching behavior)")
    ax.set_ylim(0, 1)
    ax.set_title(_title(result, "A/B"), fontsize=9)
    if len(result.layers) <= 12:
        ax.legend(fontsize=7)
    return save(fig, path, force)


def p_match_vs_layer(
    result: SweepResult, path: Path, multipliers: Sequence[float] = (-1.0, 0.0, 1.0), force: bool = False
) -> Path:
    """p(match) against the layer at each of ``multipliers`` present (the paper's layer sweep)."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    colors = {-1.0: "tab:red", 0.0: "grey", 1.0: "tab:blue"}
    for mult in multipliers:
        if mult not in result.multipliers:
            continue
        j = result.multipliers.index(mult)
        ax.plot(result.layers, result.p_match[:, j].mean(axis=-1), "o-", ms=3,
                color=colors.get(mult), label=f"multiplier {mult:+g}")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("layer")
    ax.set_ylabel("p(answer matching behavior)")
    ax.set_ylim(0, 1)
    ax.set_title(_title(result, "layer sweep"), fontsize=9)
    ax.legend(fontsize=7)
    return save(fig, path, force)


def metric_vs_multiplier(
    summary: Sequence[Mapping[str, Any]],
    metric: str,
    path: Path,
    fluency: str = "distinct_2",
    title: str = "",
    force: bool = False,
) -> Path:
    """An open-ended metric against the multiplier, with a fluency measure on a second axis."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    mults = [row["multiplier"] for row in summary]
    ax.plot(mults, [row[metric] for row in summary], "o-", color="tab:blue", label=metric)
    ax.set_xlabel("multiplier")
    ax.set_ylabel(metric, color="tab:blue")
    if all(fluency in row for row in summary):
        twin = ax.twinx()
        twin.plot(mults, [row[fluency] for row in summary], "s--", color="tab:orange", label=fluency)
        twin.set_ylabel(f"{fluency} (fluency)", color="tab:orange")
    ax.set_title(title or f"{metric} vs multiplier", fontsize=9)
    return save(fig, path, force)


def pca_grid(
    points: Mapping[int, tuple[npt.NDArray[np.floating], npt.NDArray[np.bool_]]],
    path: Path,
    title: str = "",
    letters: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """One scatter per layer of 2-D projections; ``points[layer] = (xy (n, 2), matching (n,))``.

    With ``letters`` (one per point), the answer letter picks the marker, so clustering by
    letter rather than by behavior (early layers, in the paper) shows.
    """
    layers = sorted(points)
    cols = min(6, max(len(layers), 1))
    rows = -(-len(layers) // cols)
    fig = _figure(2.2 * cols, 2.2 * rows + 0.4)
    markers = {letter: m for letter, m in zip(sorted(set(letters or [])), "os^vD<>p")}
    for k, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, k + 1)
        xy, matching = points[layer]
        for flag, color, label in ((True, "tab:blue", "matching"), (False, "tab:red", "not matching")):
            sel = np.asarray(matching) == flag
            if letters is None:
                ax.scatter(xy[sel, 0], xy[sel, 1], s=6, c=color, alpha=0.6, label=label)
                continue
            for letter, marker in markers.items():
                both = sel & (np.asarray(letters) == letter)
                ax.scatter(xy[both, 0], xy[both, 1], s=8, c=color, alpha=0.6, marker=marker,
                           label=f"{label} ({letter})")
        ax.set_title(f"layer {layer}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if k == 0:
            ax.legend(fontsize=5, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path, force)


def heatmap(
    matrix: npt.NDArray[np.floating],
    labels: Sequence[str],
    path: Path,
    title: str = "",
    col_labels: Sequence[str] | None = None,
    annotate: bool | None = None,
    force: bool = False,
) -> Path:
    """A cosine-similarity (or any -1..1) matrix as a heatmap."""
    matrix = np.asarray(matrix, dtype=float)
    cols = list(col_labels if col_labels is not None else labels)
    size = max(4.0, 0.28 * max(len(labels), len(cols)) + 2.0)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), list(labels), fontsize=7)
    if annotate if annotate is not None else matrix.size <= 100:
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(value) > 0.6 else "black")
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    if title:
        ax.set_title(title, fontsize=9)
    return save(fig, path, force)


def lines_vs_layer(
    series: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: Path,
    ylabel: str,
    title: str = "",
    ylim: tuple[float, float] | None = None,
    force: bool = False,
) -> Path:
    """One line per named series of (layers, values): layer similarity, transfer sweeps."""
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    for name, (layers, values) in series.items():
        ax.plot(list(layers), list(values), "o-", ms=3, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return save(fig, path, force)


def token_bars(tokens: Sequence[str], values: Sequence[float], path: Path, title: str = "",
               marker: int | None = None, force: bool = False) -> Path:
    """Per-token cosine with the vector as bars, token labels under them; ``marker``: first steered token."""
    n = len(tokens)
    fig = _figure(max(6.0, 0.22 * n + 1.5), 4.0)
    ax = fig.add_subplot()
    colors = ["tab:blue" if v >= 0 else "tab:red" for v in values]
    ax.bar(range(n), list(values), color=colors)
    ax.set_xticks(range(n), [t.replace("\n", "\\n") for t in tokens], rotation=90, fontsize=6)
    if marker is not None:
        ax.axvline(marker - 0.5, color="grey", ls="--", lw=0.8)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("cosine with the vector")
    ax.set_title(title, fontsize=9)
    return save(fig, path, force)


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]
