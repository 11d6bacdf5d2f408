"""Capability under steering: p(correct answer) on MMLU or TruthfulQA as A/B questions (the
correct answer against one incorrect one), overall and per category (the paper's tables).

One evaluation for one vector or for several at once (the paper's tables for every behavior):
every question's unsteered prompt is decoded once for all vectors and multipliers, on the
settings grid of ``caa_local.eval.ab`` (multiplier 0 is one shared baseline).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from caa_local.core.datasets import CapabilityItem, load_capability
from caa_local.core.layers import check_vector_layers
from caa_local.core.steering import check_multipliers
from caa_local.core.templates import user_turn
from caa_local.core.vector import ControlVector
from caa_local.engine.engine import Engine
from caa_local.engine.scoring import Choice
from caa_local.eval.ab import score_chunked, steering_grid


@dataclass
class CapabilityResult:
    """p(correct) per category x multiplier for one capability set ("mmlu", "truthfulqa")."""

    name: str
    layer: int
    multipliers: list[float]
    categories: list[str]
    p_correct: npt.NDArray[np.float64]  # (multiplier, question)
    question_category: list[str]
    option_mass: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 0)))  # (multiplier, question)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.question_category)

    def by_category(self) -> dict[str, list[float]]:
        cats = np.asarray(self.question_category)
        return {c: [float(row[cats == c].mean()) for row in self.p_correct] for c in self.categories}

    def overall(self) -> list[float]:
        return [float(row.mean()) for row in self.p_correct]

    def at(self, multiplier: float) -> float:
        """Overall p(correct) at ``multiplier`` (one of those evaluated)."""
        return self.overall()[self.multipliers.index(multiplier)]

    def counts(self) -> dict[str, int]:
        return {c: self.question_category.count(c) for c in self.categories}

    def rows(self) -> list[dict[str, Any]]:
        """One row per multiplier: overall p(correct), n and option mass."""
        return [{"multiplier": m, "p_correct": p, "n": self.n, "option_mass": float(mass.mean())}
                for m, p, mass in zip(self.multipliers, self.overall(), self.option_mass)]

    def table(self) -> str:
        """Markdown: one row per category (with n), then all questions."""
        head = "| category | n | " + " | ".join(f"x{m:+g}" for m in self.multipliers) + " |"
        lines = [head, "|---|---|" + "---|" * len(self.multipliers)]
        counts = self.counts()
        for cat, values in self.by_category().items():
            lines.append(f"| {cat} | {counts[cat]} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        lines.append(f"| **all** | {self.n} | " + " | ".join(f"**{v:.3f}**" for v in self.overall()) + " |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.name, "layer": self.layer, "multipliers": self.multipliers, "n": self.n,
                "overall": self.overall(), "results": self.rows(), "by_category": self.by_category(),
                "counts": self.counts(), **self.info}


def capability_items(name: str, limit: int | None = None, per_category: bool = False) -> list[CapabilityItem]:
    """The set's questions: the first ``limit`` of them, or with ``per_category`` the first
    ``limit`` of every category (so each stays represented)."""
    items = load_capability(name)
    if not limit:
        return items
    if not per_category:
        return items[:limit]
    seen: dict[str, int] = {}
    kept = []
    for it in items:
        if seen.get(it.category, 0) < limit:
            seen[it.category] = seen.get(it.category, 0) + 1
            kept.append(it)
    return kept


def capability_tables(
    engine: Engine,
    items: Sequence[CapabilityItem],
    name: str,
    steering: Mapping[str, tuple[ControlVector, int]],
    multipliers: Sequence[float],
    progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> dict[str, CapabilityResult]:
    """p(correct) on ``items`` (of the set ``name``) for several vectors (key -> (vector, layer))
    in one scoring pass."""
    mults = check_multipliers(multipliers)
    cells = []
    for key, (vector, layer) in steering.items():
        unit = engine.make_term(key, vector, 1.0, any_arch=force)  # the vector's one validation
        check_vector_layers([layer], vector.layers, engine.n_layer)
        cells.append((key, unit.at(layer=layer)))
    settings, index = steering_grid(cells, mults)
    choices = [Choice(tuple(user_turn(it.prompt)), it.correct[1], it.incorrect[1]) for it in items]
    scores = score_chunked(engine, choices, settings, progress=progress)
    categories = sorted({it.category for it in items})
    question_category = [it.category for it in items]
    return {
        key: CapabilityResult(name, layer, mults, categories,
                              np.stack([scores[index[(key, m)]].p_match for m in mults]), question_category,
                              np.stack([scores[index[(key, m)]].option_mass for m in mults]))
        for key, (vector, layer) in steering.items()
    }


def capability_eval(
    engine: Engine,
    name: str,
    vector: ControlVector,
    layer: int,
    multipliers: Sequence[float],
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
    per_category: bool = False,
) -> CapabilityResult:
    """p(correct answer) on "mmlu" or "truthfulqa" under one vector at one layer; ``limit``
    keeps the first N questions (with ``per_category``, the first N of every category)."""
    items = capability_items(name, limit, per_category)
    return capability_tables(engine, items, name, {"vector": (vector, layer)}, multipliers, progress, force)["vector"]
