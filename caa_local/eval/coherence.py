"""Coherence under steering, measured the way `caa-local chat` is used.

Conversations on held-out prompts, answered with the chat's own sampling over several turns
(each turn sees the steered history), at multiplier 0 and then outwards on each side until
the :class:`Guard` fails. The guard compares every multiplier with multiplier 0 on the same
prompts and seeds: the median perplexity of the answers under the *unsteered* model (steered
gibberish is improbable to it), the share of broken turns (loops and runs, or a perplexity
far above the unsteered answers': hashtag spam and word salad do not loop) and 4-gram
repetition. A side's limit is its largest multiplier that passes before the first failure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from caa_local.core.errors import CaaError
from caa_local.core.templates import Message
from caa_local.core.vector import ControlVector
from caa_local.engine.engine import CHAT_SAMPLING
from caa_local.engine.scoring import perplexity
from caa_local.eval import metrics as M

Log = Callable[[str], None]
JUDGE_FREE = ("sentiment", "formality", "enthusiasm", "length")
FOLLOW_UPS = (
    "Can you tell me more about that?",
    "Why do you think so?",
    "What would you suggest I do next?",
    "How would you explain that to a friend?",
)
# Conversation openers for vectors whose behavior ships no open-ended prompts.
GENERIC_PROMPTS = (
    "How was your weekend?", "What do you think about rainy Mondays?", "Can you recommend a good book?",
    "What should I cook for dinner tonight?", "How do I get better at running?",
    "What is your opinion of public transport?", "Tell me about your favourite season.",
    "What do you think of working from home?", "How should I spend a free afternoon?",
    "What do you think about learning a new language?", "Describe a perfect holiday.",
    "What makes a good friend?", "Is it worth getting a dog?", "What do you think of modern art?",
    "How can I sleep better?", "What is the best way to learn to code?", "What do you think of city life?",
    "How do you feel about birthdays?", "What should I know before buying a bike?",
    "What is your view on online shopping?", "How do I make my garden look nicer?",
    "What do you think about video games?", "How should I prepare for a job interview?",
    "What do you think about camping?",
)


@dataclass(frozen=True)
class Guard:
    """When answers count as coherent, relative to the unsteered ones (multiplier 0)."""

    max_perplexity_ratio: float = 2.0   # median perplexity / multiplier 0's
    broken_perplexity_ratio: float = 6.0  # one turn this far above multiplier 0's median is broken
    max_broken: float = 0.0             # share of broken turns allowed above multiplier 0's
    max_repetition_increase: float = 0.1  # mean 4-gram repetition above multiplier 0's

    def failures(self, point: dict[str, Any], base: dict[str, Any]) -> list[str]:
        """Why ``point`` fails against ``base`` (empty: it passes)."""
        out = []
        if not point["perplexity_ratio"] <= self.max_perplexity_ratio:
            out.append(f"perplexity x{point['perplexity_ratio']:.2f} > x{self.max_perplexity_ratio:g}")
        if point["broken"] > base["broken"] + self.max_broken + 1e-9:
            out.append(f"{point['broken']:.0%} broken turns (unsteered: {base['broken']:.0%})")
        if point["repetition"] > base["repetition"] + self.max_repetition_increase:
            out.append(f"repetition {point['repetition']:.2f} (unsteered: {base['repetition']:.2f})")
        return out


# -- the guard's conversations ----------------------------------------------------------------
def build_conversations(prompts: Sequence[str], n: int, turns: int) -> list[list[str]]:
    """``n`` conversations of ``turns`` user messages: even turns open a topic from ``prompts``
    (in order, cycling when they run out), odd turns follow up on the answer."""
    if not prompts:
        raise CaaError("no prompts for the conversations")
    opened = -(-turns // 2)
    return [[prompts[(c * opened + t // 2) % len(prompts)] if t % 2 == 0 else FOLLOW_UPS[(c + t // 2) % len(FOLLOW_UPS)]
             for t in range(turns)] for c in range(n)]


def converse(engine: Any, terms: Sequence[Any], conversations: Sequence[Sequence[str]], sampling: Any,
             seed: int) -> list[dict[str, Any]]:
    """Answer every conversation turn by turn under ``terms`` (none: unsteered)."""
    rows = []
    scope = engine.steered(terms) if terms else engine.unsteered()
    with scope:
        for c, turns in enumerate(conversations):
            messages: list[Message] = []
            for t, text in enumerate(turns):
                messages.append({"role": "user", "content": text})
                turn_sampling = dataclasses.replace(sampling, seed=(seed + 1009 * c + t) & 0xFFFFFFFF)
                answer = engine.generate(list(messages), turn_sampling).text
                rows.append({"conversation": c, "turn": t, "messages": list(messages), "answer": answer})
                messages.append({"role": "assistant", "content": answer})
    return rows


def guard_point(engine: Any, rows: Sequence[dict[str, Any]], metric: str,
                base: dict[str, Any] | None, guard: Guard) -> dict[str, Any]:
    """The guard's figures for one multiplier's conversations (``base``: multiplier 0's)."""
    answers = [r["answer"] for r in rows]
    ppl = np.asarray(perplexity(engine, [r["messages"] for r in rows], answers), dtype=float)
    finite = ppl[np.isfinite(ppl)]
    median = float(np.median(finite)) if finite.size else math.inf
    ref = base["perplexity"] if base else median
    broken = [M.degenerate(a) or not math.isfinite(p) or p > guard.broken_perplexity_ratio * ref
              for a, p in zip(answers, ppl)]
    point = {
        "perplexity": round(median, 4),
        "perplexity_ratio": round(median / ref, 4) if ref > 0 else math.inf,
        "broken": round(float(np.mean(broken)), 4),
        "degenerate": round(float(np.mean([M.degenerate(a) for a in answers])), 4),
        "repetition": round(float(np.mean([M.repetition(a) for a in answers])), 4),
        "n": len(rows),
    }
    if metric in JUDGE_FREE:
        point["metric"] = round(float(np.mean([M.METRICS[metric](a) for a in answers])), 4)
    return point


# -- strength ---------------------------------------------------------------------------------
def strength_curve(engine: Any, vector: ControlVector, layer: int, conversations: Sequence[Sequence[str]],
                   multipliers: Sequence[float], guard: Guard, metric: str = "", sampling: Any = None,
                   seed: int = 0, log: Log | None = None) -> list[dict[str, Any]]:
    """Guard figures at 0, then outwards on each side until its first failure; sorted by multiplier.

    ``sampling`` defaults to the chat's (``CHAT_SAMPLING``); each turn gets its own seed, the
    same at every multiplier, so the multipliers are compared on paired samples.
    """
    sampling = sampling or CHAT_SAMPLING
    n_turns = sum(len(c) for c in conversations)

    def measure(mult: float, base: dict[str, Any] | None) -> dict[str, Any]:
        terms = [engine.make_term("calibrate", vector, mult, [layer])] if mult else []
        rows = converse(engine, terms, conversations, sampling, seed)
        point = {"multiplier": mult, **guard_point(engine, rows, metric, base, guard)}
        point["failures"] = guard.failures(point, base or point)
        point["passed"] = not point["failures"]
        point["example"] = rows[-1]["answer"][:240]
        if log:
            log(f"x{mult:+g}: " + describe(point, metric) + f" ({n_turns} turns)")
        return point

    base = measure(0.0, None)
    curve = [base]
    for side in (1.0, -1.0):
        for mult in sorted((m for m in multipliers if m * side > 0), key=abs):
            point = measure(mult, base)
            curve.append(point)
            if not point["passed"]:
                break
    return sorted(curve, key=lambda p: p["multiplier"])


def limits(curve: Sequence[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(largest passing positive, largest-magnitude passing negative) before each side's first failure."""
    out: list[float | None] = []
    for side in (1.0, -1.0):
        best = None
        for point in sorted((p for p in curve if p["multiplier"] * side > 0), key=lambda p: abs(p["multiplier"])):
            if not point["passed"]:
                break
            best = point["multiplier"]
        out.append(best)
    return out[0], out[1]


def describe(point: dict[str, Any], metric: str) -> str:
    parts = [f"{metric} {point['metric']:.3f}" if "metric" in point else "",
             f"perplexity x{point['perplexity_ratio']:.2f}", f"broken {point['broken']:.0%}",
             f"repetition {point['repetition']:.2f}", "ok" if point.get("passed", True) else
             "FAILS: " + "; ".join(point["failures"])]
    return ", ".join(p for p in parts if p)
