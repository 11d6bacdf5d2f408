"""Steering terms gated on conditions: which terms apply to one answer (CAST, core/condition.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from caa_local.core.condition import ConditionError, Tokenize, last_user_span
from caa_local.core.steering import SteeringTerm
from caa_local.core.templates import ChatTemplate, Message


@dataclass(frozen=True)
class ConditionCheck:
    """What the engine needs for one answer: where the last user message is in the prompt's
    tokens (``span``, end exclusive, before steering starts), and the terms that wait for
    their conditions (``SteeringTerm.conditions``, OR within a term)."""

    span: tuple[int, int]
    terms: tuple[SteeringTerm, ...]

    @property
    def layers(self) -> list[int]:
        return sorted({c.layer for t in self.terms for c in t.conditions})

    def decide(self, reads: Mapping[int, npt.NDArray[np.float32]]) -> tuple[list[SteeringTerm], list[dict[str, Any]]]:
        """(terms that apply, as plain terms; one report per condition) from the span's mean
        block outputs per layer."""
        chosen: list[SteeringTerm] = []
        report: list[dict[str, Any]] = []
        for term in self.terms:
            fired_any = False
            for cond in term.conditions:
                score = cond.score(reads[cond.layer])
                fired = cond.fires(score)
                fired_any = fired_any or fired
                report.append({"vector": term.name, "condition": cond.name, "score": score,
                               "threshold": cond.threshold, "comparison": cond.comparison,
                               "invert": cond.invert, "layer": cond.layer, "fired": fired})
            if fired_any:
                chosen.append(term.with_conditions(()))
        return chosen, report


def make_check(template: ChatTemplate, tokenize: Tokenize, messages: Sequence[Message], tokens: Sequence[int],
               steer_from: int, terms: Sequence[SteeringTerm]) -> ConditionCheck:
    start, end = last_user_span(template, tokenize, messages, tokens)
    if end > steer_from:
        raise ConditionError("conditions are read from the unsteered prompt: use --positions response")
    return ConditionCheck((start, end), tuple(terms))
