"""Conditions in chat and generate: `--when`, `/when`, `/conditions`, and how a decision reads.

A condition spec is ``[!]NAME|FILE[:THRESHOLD]``: a shipped condition (e.g. ``work``) or a
``caa.kind = condition`` file, optionally with a threshold that overrides the calibrated one;
a leading ``!`` inverts it ("unless"). Several conditions on one vector mean OR.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caa_local.core.condition import Condition, ConditionError
from caa_local.core.locate import load_vector
from caa_local.core.parsing import parse_scale
from caa_local.core.steering import SteeringTerm
from caa_local.engine.engine import Engine


def parse_when(spec: str) -> tuple[str, float | None, bool]:
    """(name or file, threshold or None, invert) of ``[!]NAME|FILE[:THRESHOLD]``."""
    text = spec.strip()
    invert = text.startswith("!")
    text = text[1:] if invert else text
    head, sep, tail = text.rpartition(":")
    if sep and head and "/" not in tail and "\\" not in tail and not Path(text).exists():
        target, threshold = head, parse_scale(tail, f"condition {spec!r}: threshold")
    else:
        target, threshold = text, None
    if not target:
        raise ConditionError(f"condition {spec!r}: expected [!]NAME|FILE[:THRESHOLD]")
    return target, threshold, invert


def load_condition(engine: Engine, spec: str, any_arch: bool = False) -> Condition:
    target, threshold, invert = parse_when(spec)
    path, vector = load_vector(target)
    return engine.make_condition(path.stem, vector, threshold, invert, any_arch)


def gate(engine: Engine, names: Sequence[str], conditions: Sequence[Condition], add: bool = True) -> list[SteeringTerm]:
    """Put ``conditions`` on the active terms ``names`` (added to theirs, OR; or replacing them
    with ``add=False``); all or nothing. The gated terms back."""
    terms = {t.name: t for t in engine.steering.terms}
    missing = [n for n in names if n not in terms]
    if missing:
        raise ConditionError(f"no active vector named {missing[0]!r} (active: {', '.join(terms) or 'none'}; "
                             "use --vector or /steer first)")
    gated = {n: terms[n].with_conditions([*(terms[n].conditions if add else ()), *conditions]) for n in names}
    engine.set_steering([gated.get(t.name, t) for t in engine.steering.terms])
    return list(gated.values())


def describe_report(report: Sequence[dict[str, Any]]) -> str:
    """'sentiment when work: fired (score 0.0011 < 0.107)' for each condition checked on the last
    answer ('unless work: fired' means the term applied because work did not)."""
    parts = []
    for r in report:
        sign = ">" if r["comparison"] == "above" else "<"
        holds = r["fired"] != r["invert"]  # whether the score passed the threshold
        parts.append(f"{r['vector']} {'unless' if r['invert'] else 'when'} {r['condition']}: "
                     f"{'fired' if r['fired'] else 'not fired'} (score {r['score']:.4g} "
                     f"{sign if holds else ('>=' if sign == '<' else '<=')} {r['threshold']:.4g})")
    return "; ".join(parts)
