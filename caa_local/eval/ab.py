"""The paper's A/B evaluations on the native engine: behavior sweeps and capability sets.

An A/B sweep scores every question under one setting per (layer, multiplier) with the
batched scorer (each question's unsteered prefix is decoded once for all settings);
multiplier 0 is one shared baseline, identical for every layer. Rows hold means over
questions; the per-question arrays stay in the result for the analyses of Tan et al. (2024):
steerability (least-squares slope of the mean logit difference against the multiplier) and
the fraction of anti-steerable questions (whose own slope has the opposite sign).
``ab_sweep_torch`` is the transformers reference (small sets only, its forward passes in
``caa_local.torch.ab``); capability sets live in ``caa_local.eval.capability`` and open-ended
answers in ``caa_local.eval.open_ended``, both on this module's settings grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError
from caa_local.core.layers import check_vector_layers
from caa_local.core.steering import SteeringTerm, check_multipliers
from caa_local.core.templates import ChatTemplate
from caa_local.core.vector import ControlVector
from caa_local.engine.engine import Engine
from caa_local.engine.scoring import ABScores, Choice, Setting, choices_from_items, score_ab

Progress = Callable[[int], None]
CHUNK_QUESTIONS = 32  # questions per scoring call: bounds memory and keeps progress moving


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _slopes(x: npt.NDArray[np.float64], y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """Least-squares slope of y over x, along y's last axis (NaN with fewer than 2 x values)."""
    if len(set(x.tolist())) < 2:
        return np.full(y.shape[:-1], np.nan)
    dx = x - x.mean()
    return ((y - y.mean(axis=-1, keepdims=True)) * dx).sum(axis=-1) / (dx * dx).sum()


@dataclass
class SweepResult:
    """Scores of every question at every (layer, multiplier); arrays are (layer, mult, question)."""

    layers: list[int]
    multipliers: list[float]
    p_match: npt.NDArray[np.float64]
    option_mass: npt.NDArray[np.float64]
    logit_diff: npt.NDArray[np.float64]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.p_match.shape[-1])

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "layer": layer,
                "multiplier": mult,
                "p_match": float(self.p_match[i, j].mean()),
                "n": self.n,
                "option_mass": float(self.option_mass[i, j].mean()),
                "logit_diff": float(self.logit_diff[i, j].mean()),
            }
            for i, layer in enumerate(self.layers)
            for j, mult in enumerate(self.multipliers)
        ]

    def mean(self, layer: int, multiplier: float, what: str = "p_match") -> float:
        arr = getattr(self, what)
        return float(arr[self.layers.index(layer), self.multipliers.index(multiplier)].mean())

    def question_slopes(self) -> npt.NDArray[np.float64]:
        """(layer, question): slope of each question's logit difference over the multipliers."""
        return _slopes(np.asarray(self.multipliers, float), np.moveaxis(self.logit_diff, 1, -1))

    def steerability(self) -> dict[int, float | None]:
        """Per layer: slope of the mean logit difference (nats per unit multiplier)."""
        mean = self.logit_diff.mean(axis=-1)
        slopes = _slopes(np.asarray(self.multipliers, float), mean)
        return {layer: _finite(s) for layer, s in zip(self.layers, slopes)}

    def anti_steerable(self) -> dict[int, float | None]:
        """Per layer: fraction of questions whose slope has the opposite sign to the mean's."""
        per_q = self.question_slopes()
        out: dict[int, float | None] = {}
        for i, layer in enumerate(self.layers):
            mean = per_q[i].mean()
            out[layer] = None if not math.isfinite(mean) else float((per_q[i] * mean < 0).mean())
        return out

    def per_question(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "multipliers": self.multipliers,
            "p_match": self.p_match.round(6).tolist(),
            "logit_diff": self.logit_diff.round(6).tolist(),
            "option_mass": self.option_mass.round(6).tolist(),
        }

    def to_json(self, per_question: bool = True) -> dict[str, Any]:
        """The ``eval ab --json`` document; the keys of ``info`` go to the top level."""
        out: dict[str, Any] = {k: self.info.get(k, "") for k in ("model", "vector", "dataset", "backend")}
        out["results"] = self.rows()
        out.update({k: v for k, v in self.info.items() if k not in out})
        out["steerability"] = {str(k): v for k, v in self.steerability().items()}
        out["anti_steerable"] = {str(k): v for k, v in self.anti_steerable().items()}
        if per_question:
            out["per_question"] = self.per_question()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "SweepResult":
        """Back from an ``eval ab --json`` document that has ``per_question``."""
        pq = data.get("per_question")
        if not isinstance(pq, dict) or "logit_diff" not in pq:
            raise CaaError("results file has no 'per_question' data (written by an old version?)")
        try:
            arrays = {k: np.asarray(pq[k], dtype=np.float64) for k in ("p_match", "logit_diff", "option_mass")}
            layers = [int(x) for x in pq["layers"]]
            mults = [float(x) for x in pq["multipliers"]]
        except (KeyError, TypeError, ValueError) as err:
            raise CaaError(f"results file: malformed 'per_question' data ({err})") from None
        if any(a.shape[:2] != (len(layers), len(mults)) or a.ndim != 3 for a in arrays.values()):
            raise CaaError("results file: 'per_question' arrays do not match its layers and multipliers")
        info = {k: v for k, v in data.items() if k not in ("results", "per_question")}
        return cls(layers, mults, arrays["p_match"], arrays["option_mass"], arrays["logit_diff"], info)


Grid = tuple[list[Setting], dict[tuple[Hashable, float], int]]


def steering_grid(cells: Sequence[tuple[Hashable, SteeringTerm]], multipliers: Sequence[float]) -> Grid:
    """The settings to score for every (cell, multiplier): the cell's term (a vector on its
    layer) at that multiplier. Multiplier 0 is one unsteered baseline shared by every cell.
    Returns (settings, index of (cell key, multiplier) -> setting)."""
    settings: list[Setting] = []
    index: dict[tuple[Hashable, float], int] = {}
    baseline: int | None = None
    for key, term in cells:
        for mult in multipliers:
            if mult == 0.0:
                if baseline is None:
                    baseline = len(settings)
                    settings.append(())
                index[(key, mult)] = baseline
            else:
                index[(key, mult)] = len(settings)
                settings.append((term.at(scale=mult),))
    return settings, index


def score_chunked(engine: Engine, choices: Sequence[Choice], settings: Sequence[Setting], positions: str = "response",
                  progress: Progress | None = None) -> list[ABScores]:
    """``score_ab`` over ``CHUNK_QUESTIONS`` questions at a time (memory stays bounded, progress
    moves); one ABScores per setting, questions in order."""
    parts = [score_ab(engine, choices[start : start + CHUNK_QUESTIONS], settings, positions, progress)
             for start in range(0, len(choices), CHUNK_QUESTIONS)]
    return [ABScores(np.concatenate([p[s].logp_matching for p in parts]),
                     np.concatenate([p[s].logp_not_matching for p in parts])) for s in range(len(settings))]


def sweep_choices(
    engine: Engine,
    vector: ControlVector,
    choices: Sequence[Choice],
    layers: Sequence[int],
    multipliers: Sequence[float],
    progress: Progress | None = None,
    force: bool = False,
    positions: str = "response",
) -> SweepResult:
    """Score ``choices`` at every (layer, multiplier); multiplier 0 is scored once."""
    unit = engine.make_term("vector", vector, 1.0, any_arch=force)  # the vector's one validation
    layers = check_vector_layers(layers, vector.layers, engine.n_layer)
    multipliers = check_multipliers(multipliers)
    if not choices:
        raise CaaError("no questions to evaluate")
    settings, index = steering_grid([(layer, unit.at(layer=layer)) for layer in layers], multipliers)
    scores = score_chunked(engine, choices, settings, positions, progress)
    shape = (len(layers), len(multipliers), len(choices))
    arrays = {k: np.zeros(shape) for k in ("p_match", "option_mass", "logit_diff")}
    for i, layer in enumerate(layers):
        for j, mult in enumerate(multipliers):
            for name, arr in arrays.items():
                arr[i, j] = getattr(scores[index[(layer, mult)]], name)
    return SweepResult(layers, multipliers, arrays["p_match"], arrays["option_mass"], arrays["logit_diff"])


def ab_sweep(
    engine: Engine,
    vector: ControlVector,
    dataset_items: Sequence[Any],
    layers: Sequence[int],
    multipliers: Sequence[float],
    system: str | None = None,
    progress: Progress | None = None,
    force: bool = False,
    positions: str = "response",
) -> SweepResult:
    """The paper's A/B evaluation of ABItems (question, matching / not-matching letters)."""
    if not dataset_items:
        raise CaaError("no questions to evaluate")
    result = sweep_choices(
        engine, vector, choices_from_items(dataset_items, system), layers, multipliers, progress, force, positions
    )
    result.info.update(backend="native", positions=positions, system=system or "")
    return result


# -- the torch reference -------------------------------------------------------------------------
def ab_sweep_torch(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    vector: ControlVector,
    dataset_items: Sequence[Any],
    layers: Sequence[int],
    multipliers: Sequence[float],
    system: str | None = None,
    positions: str = "response",
    progress: Progress | None = None,
) -> SweepResult:
    """:func:`ab_sweep` with transformers and torch hooks: full prompts, one pass per answer."""
    from caa_local.torch.ab import answer_logprobs  # the torch extra, loaded only when asked for

    n_layer = int(model.config.num_hidden_layers)
    vector.check_fits(int(model.config.hidden_size), n_layer, "vector")
    layers = check_vector_layers(layers, vector.layers, n_layer)
    multipliers = check_multipliers(multipliers)
    questions = [(c.messages, (c.matching, c.not_matching)) for c in choices_from_items(dataset_items, system)]
    logp = answer_logprobs(model, tokenizer, template, vector, questions, layers, multipliers, positions, progress)
    diff = logp[..., 0] - logp[..., 1]
    result = SweepResult(layers, multipliers, 1.0 / (1.0 + np.exp(-diff)),
                         np.exp(logp[..., 0]) + np.exp(logp[..., 1]), diff)
    result.info.update(backend="torch", positions=positions, system=system or "")
    return result
