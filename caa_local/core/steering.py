"""Composed steering: several vectors, each with its own scale and layers, summed into one buffer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError
from caa_local.core.layers import cvec_buffer, format_layers, no_direction
from caa_local.core.vector import ControlVector

if TYPE_CHECKING:
    from caa_local.core.condition import Condition

ABSURD_MULTIPLIER = 50.0


@dataclass(frozen=True)
class SteeringTerm:
    """One vector at one scale on some of its layers (build it with ``make_term``; the
    model-dependent checks happen where it meets a model, in ``Steering.buffer``)."""

    name: str
    vector: ControlVector
    scale: float
    layers: tuple[int, ...]
    # Conditions (core/condition.py): the term applies to an answer only when one fires (OR).
    conditions: tuple[Condition, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", check_multiplier(self.scale))
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise CaaError(f"vector {self.name!r}: no layers to steer")
        missing = [layer for layer in self.layers if layer not in self.vector.directions]
        if missing:
            raise no_direction(f"vector {self.name!r}", missing[0], self.vector.layers)

    def describe(self) -> str:
        when = f" {' or '.join(c.describe() for c in self.conditions)}" if self.conditions else ""
        return f"{self.name} x{self.scale:+g} @ {format_layers(self.layers)}{when}"

    def with_conditions(self, conditions: Sequence[Condition]) -> SteeringTerm:
        """The same term, applied only when one of ``conditions`` fires (none: always)."""
        return replace(self, conditions=tuple(conditions))

    def at(self, layer: int | Sequence[int] | None = None, scale: float | None = None) -> SteeringTerm:
        """The same vector on other layers (one or several, each held by the vector) and/or at
        another multiplier."""
        layers = self.layers if layer is None else tuple(sorted({layer} if isinstance(layer, int) else set(layer)))
        return replace(self, layers=layers, scale=self.scale if scale is None else scale)


def default_layers(vector: ControlVector) -> tuple[int, ...]:
    """The vector's recommended layer when it records one, else every layer it holds.

    Every layer is what llama.cpp's ``--control-vector`` does with a file (and what repeng
    files expect); CAA vectors from caa-local record the layer chosen on validation data.
    """
    recommended = vector.recommended_layer()
    if recommended is not None and recommended in vector.directions:
        return (recommended,)
    return tuple(vector.layers)


def check_multiplier(scale: float) -> float:
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise CaaError(f"multiplier must be a finite number, got {scale!r}")
    return float(scale)


def check_multipliers(multipliers: Sequence[float]) -> list[float]:
    """A sweep's multipliers: finite, distinct, sorted."""
    if not multipliers:
        raise CaaError("no multipliers given")
    out = [check_multiplier(m) for m in multipliers]
    if len(set(out)) != len(out):
        raise CaaError(f"multipliers repeat a value: {', '.join(f'{m:g}' for m in out)}")
    return sorted(out)


def multiplier_warning(scale: float) -> str | None:
    """The one warning for an absurd multiplier (|x| > ABSURD_MULTIPLIER), or None."""
    if abs(scale) <= ABSURD_MULTIPLIER:
        return None
    return (f"Warning: multiplier {scale:+g} is far outside the usual range "
            f"(|x| > {ABSURD_MULTIPLIER:g}); expect gibberish")


def make_term(name: str, vector: ControlVector, scale: float,
              layers: Sequence[int] | None = None) -> SteeringTerm:
    """A term on ``layers`` (default: ``default_layers``), each of them held by the vector.

    Model-independent checks only; ``Engine.make_term`` adds the model's.
    """
    if vector.kind == "condition":
        raise CaaError(f"{name}: is a condition, not a behavior vector (use it with --when {name})")
    return SteeringTerm(name, vector, scale, default_layers(vector)).at(layers or None)


class Steering:
    """An immutable, ordered set of named terms; ``buffer`` lays them out for llama.cpp.

    A later term replaces an earlier one of the same name.
    """

    def __init__(self, terms: Iterable[SteeringTerm] = ()) -> None:
        self._terms: dict[str, SteeringTerm] = {}
        for term in terms:
            self._terms[term.name] = term

    def with_term(self, term: SteeringTerm) -> Steering:
        """This steering with ``term`` added, or replacing the term of its name in place."""
        terms = dict(self._terms)
        terms[term.name] = term
        return Steering(terms.values())

    def without(self, name: str) -> Steering:
        if name not in self._terms:
            raise CaaError(f"no active vector named {name!r} (active: {', '.join(self._terms) or 'none'})")
        return Steering(t for t in self._terms.values() if t.name != name)

    @property
    def terms(self) -> tuple[SteeringTerm, ...]:
        return tuple(self._terms.values())

    def get(self, name: str) -> SteeringTerm | None:
        return self._terms.get(name)

    def __bool__(self) -> bool:
        return any(t.scale != 0.0 for t in self._terms.values())

    @property
    def conditional(self) -> tuple[SteeringTerm, ...]:
        """The terms that wait for a condition (left out of ``buffer``)."""
        return tuple(t for t in self._terms.values() if t.conditions)

    def describe(self) -> str:
        return "; ".join(t.describe() for t in self._terms.values()) or "off"

    def to_dict(self) -> list[dict[str, object]]:
        return [
            {"name": t.name, "scale": t.scale, "layers": list(t.layers),
             "behavior": t.vector.metadata.get("behavior", ""),
             **({"when": [c.describe() for c in t.conditions]} if t.conditions else {})}
            for t in self._terms.values()
        ]

    def buffer(self, n_embd: int, n_layer: int) -> tuple[npt.NDArray[np.float32], int, int] | None:
        """(buf, il_start, il_end) for llama_set_adapter_cvec, or None when nothing steers."""
        if not self:
            return None
        summed: dict[int, npt.NDArray[np.float32]] = {}
        for term in self._terms.values():
            if term.conditions:  # applied only once a condition fires (Engine.generate)
                continue
            term.vector.check_fits(n_embd, n_layer, where=term.name)
            for layer in term.layers:
                add = term.vector.directions[layer] * np.float32(term.scale)
                summed[layer] = summed[layer] + add if layer in summed else add
        if not summed:
            return None
        buf = cvec_buffer(summed, n_embd, n_layer)
        return buf, min(summed), max(summed)
