"""Coherence under steering, measured the way `caa-local chat` is used.

Conversations on held-out prompts, answered with the chat's own sampling over several turns
(each turn sees the steered history), at multiplier 0 and then outwards on each side until
the :class:`Guard` fails. The guard compares every multiplier with multiplier 0 on the same
prompts and seeds: the median perplexity of the answers under the *unsteered* model (steered
gibberish is improbable to it), the share of broken turns (loops and runs, or a perplexity
far above the unsteered answers': hashtag spam and word salad do not loop) and 4-gram
repetition. A side's limit is its largest multiplier that passes before the first failure.

``strength_curve`` finds that limit by a search: coarse steps outwards along the grid, then
bisection between the last pass and the first failure, both sides in the same rounds, each
multiplier screened on a third of the conversations; only the multiplier it would recommend
answers them all (and the next smaller one if the whole set fails it). Every round's
conversations (all its multipliers, turn by turn) decode together in one
``caa_local.engine.batch.Batch``, and a multiplier stops early once its failure is certain.
``strength_walk`` is the exhaustive walk it replaces (one conversation at a time, every
multiplier outwards until the first failure), kept as the reference the search is checked
against.
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
from caa_local.engine.batch import Batch, Conversation, sequences_within
from caa_local.engine.engine import CHAT_SAMPLING
from caa_local.engine.scoring import answer_span, perplexity
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

    def certain_failure(self, ppl: Sequence[float], broken: Sequence[bool], repetition: Sequence[float],
                        n_total: int, base: dict[str, Any]) -> bool:
        """Whether the turns answered so far fail the guard whatever the remaining turns of
        ``n_total`` give: enough broken turns, enough repetition (neither can go down), or
        more than half of all turns above the perplexity limit (the median then is too)."""
        if sum(broken) / n_total > base["broken"] + self.max_broken + 1e-9:
            return True
        if sum(repetition) / n_total > base["repetition"] + self.max_repetition_increase:
            return True
        above = sum(1 for p in ppl if math.isfinite(p) and p > self.max_perplexity_ratio * base["perplexity"])
        return above >= n_total // 2 + 1

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
    if all("perplexity" in r for r in rows):  # measured as the turns came (strength_curve)
        ppl = np.asarray([r["perplexity"] for r in rows], dtype=float)
    else:
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
def strength_walk(engine: Any, vector: ControlVector, layer: int, conversations: Sequence[Sequence[str]],
                  multipliers: Sequence[float], guard: Guard, metric: str = "", sampling: Any = None,
                  seed: int = 0, log: Log | None = None) -> list[dict[str, Any]]:
    """The exhaustive walk: guard figures at 0, then every multiplier outwards on each side
    until its first failure, one conversation at a time; sorted by multiplier.

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


# Coarse steps of the search: every STRIDE-th multiplier of a side's grid until one fails.
STRIDE = 2
# The search screens a multiplier on this share of the conversations (when there are at least
# SCREEN_MIN_CONVERSATIONS) and answers the rest only where it would recommend the multiplier.
SCREEN_SHARE = 3
SCREEN_MIN_CONVERSATIONS = 6

Job = tuple[Sequence[Any], Sequence[int]]  # (steering terms, empty: unsteered; conversation indices)


def converse_batched(engine: Any, batch: Any, jobs: Sequence[Job], conversations: Sequence[Sequence[str]],
                     sampling: Any, seed: int,
                     keep_going: Callable[[int, list[dict[str, Any]]], bool] | None = None
                     ) -> list[list[dict[str, Any]]]:
    """``converse`` for several jobs (a setting and which of ``conversations`` to answer under
    it) at once: each turn of every conversation of every job still going decodes in one
    ``batch.run``; each row gets the answer's perplexity under the unsteered model, scored in the
    same batch (the unsteered conversation it leaves cached is where the next turn starts). A turn's seed
    depends on its conversation's index in ``conversations``, so a job over a subset answers
    exactly as the whole set would. After each turn ``keep_going(job, rows so far)`` may drop a
    job (its rows stay as they are)."""
    rows: list[list[dict[str, Any]]] = [[] for _ in jobs]
    history: list[dict[int, list[Message]]] = [{c: [] for c in ids} for _, ids in jobs]
    active = list(range(len(jobs)))
    for t in range(max((len(c) for c in conversations), default=0)):
        items, where = [], []
        for j in active:
            terms, ids = jobs[j]
            for c in ids:
                if t >= len(conversations[c]):
                    continue
                history[j][c].append({"role": "user", "content": conversations[c][t]})
                tokens, steer_from = engine.prompt(history[j][c])
                turn_sampling = dataclasses.replace(sampling, seed=(seed + 1009 * c + t) & 0xFFFFFFFF)
                items.append(Conversation(tokens, steer_from, tuple(terms), turn_sampling))
                where.append((j, c))
        if not items:
            break
        answers = [r.text for r in batch.run(items)]
        # Scored in the batch too: each conversation's unsteered KV, kept for its next turn.
        ppl = batch.perplexities([answer_span(engine, history[j][c], answer)[::2]
                                  for (j, c), answer in zip(where, answers)])
        for (j, c), answer, p in zip(where, answers, ppl):
            rows[j].append({"conversation": c, "turn": t, "messages": list(history[j][c]), "answer": answer,
                            "perplexity": float(p)})
            history[j][c].append({"role": "assistant", "content": answer})
        if keep_going is not None:
            active = [j for j in active if keep_going(j, rows[j])]
    return rows


def strength_curve(engine: Any, vector: ControlVector, layer: int, conversations: Sequence[Sequence[str]],
                   multipliers: Sequence[float], guard: Guard, metric: str = "", sampling: Any = None,
                   seed: int = 0, log: Log | None = None, n_seq: int = 0) -> list[dict[str, Any]]:
    """Guard figures at 0, then a search for each side's limit (the walk's answer where pass and
    fail are monotone along the grid and the screen agrees with the whole set); sorted by
    multiplier.

    Multiplier 0 answers every conversation. The search screens a multiplier on the first third
    of the conversations (``SCREEN_SHARE``; all of them below ``SCREEN_MIN_CONVERSATIONS``):
    coarse steps outwards, then bisection between the last pass and the first failure, both
    sides in the same rounds. The largest screened pass of a side then answers the remaining
    conversations; if the whole set fails it, the next smaller multiplier is answered in full,
    and so on: a recommended multiplier has always passed on every conversation. A point that
    was only screened has ``"screened": True``; one whose failure was certain before its last
    turn (against the turns it was asked: the screen's, or the whole set's)
    ``"stopped_early": True``; the figures are over the turns it answered. ``n_seq``: sequences decoded together (0: one per conversation, at
    most 16).

    ``sampling`` defaults to the chat's (``CHAT_SAMPLING``); each turn gets its own seed, the
    same at every multiplier, so the multipliers are compared on paired samples.
    """
    sampling = sampling or CHAT_SAMPLING
    n_turns = sum(len(c) for c in conversations)
    everyone = list(range(len(conversations)))
    screen = everyone if len(everyone) < SCREEN_MIN_CONVERSATIONS else everyone[: -(-len(everyone) // SCREEN_SHARE)]
    batch = _conversation_batch(engine, conversations, sampling.max_tokens, n_seq)
    rows: dict[float, list[dict[str, Any]]] = {}
    points: dict[float, dict[str, Any]] = {}

    def measure(asks: Sequence[tuple[float, Sequence[int]]], base: dict[str, Any] | None) -> None:
        """Answer each (multiplier, conversations) ask and (re)score its multiplier's point."""
        jobs = [([engine.make_term("calibrate", vector, m, [layer])] if m else [], ids) for m, ids in asks]
        # The turns each point is judged on once this round ends (a screen: its share only).
        totals = [len(rows.get(m, [])) + sum(len(conversations[c]) for c in ids) for m, ids in asks]

        def keep_going(j: int, new: list[dict[str, Any]]) -> bool:
            done = rows.get(asks[j][0], []) + new
            return base is None or not guard.certain_failure(
                [r["perplexity"] for r in done], [_broken(r, base, guard) for r in done],
                [M.repetition(r["answer"]) for r in done], totals[j], base)

        for (mult, ids), new in zip(asks, converse_batched(engine, batch, jobs, conversations, sampling, seed,
                                                           keep_going)):
            done = rows.setdefault(mult, [])
            done += new
            point = {"multiplier": mult, **guard_point(engine, done, metric, base, guard)}
            point["failures"] = guard.failures(point, base or point)
            if len(new) < sum(len(conversations[c]) for c in ids):
                point["stopped_early"] = True
                point["failures"] = point["failures"] or ["failure certain before the last turn"]
            if len(done) < n_turns and not point.get("stopped_early"):
                point["screened"] = True
            point["passed"] = not point["failures"]
            point["example"] = done[-1]["answer"][:240]
            points[mult] = point
            if log:
                log(f"x{mult:+g}: " + describe(point, metric) + f" ({len(done)} of {n_turns} turns)")

    measure([(0.0, everyone)], None)
    base = points[0.0]
    grids = {side: sorted((m for m in multipliers if m * side > 0), key=abs) for side in (1.0, -1.0)}
    bounds = {side: [-1, len(grid)] for side, grid in grids.items()}  # last pass, first failure
    while True:  # the screen: coarse steps, then bisection
        probes = []
        for side, (lo, hi) in bounds.items():
            if hi - lo > 1:
                failed_yet = hi < len(grids[side])
                probes.append((side, (lo + hi) // 2 if failed_yet else min(lo + STRIDE, hi - 1)))
        if not probes:
            break
        measure([(grids[side][i], screen) for side, i in probes], base)
        for side, i in probes:
            bounds[side][0 if points[grids[side][i]]["passed"] else 1] = i
    while True:  # the whole set: a side's largest screened pass, downwards until one passes in full
        asks = []
        for side, (lo, _) in bounds.items():
            if lo >= 0 and points.get(grids[side][lo], {"screened": True}).get("screened"):
                mult = grids[side][lo]
                asked = {r["conversation"] for r in rows.get(mult, [])}
                asks.append((side, mult, [c for c in everyone if c not in asked]))
        if not asks:
            break
        measure([(mult, ids) for _, mult, ids in asks], base)
        for side, mult, _ in asks:
            if not points[mult]["passed"]:
                bounds[side][0] -= 1
    return sorted(points.values(), key=lambda p: p["multiplier"])


def _broken(row: dict[str, Any], base: dict[str, Any], guard: Guard) -> bool:
    """One turn is broken (as guard_point counts it), against multiplier 0's median perplexity."""
    p = row["perplexity"]
    return M.degenerate(row["answer"]) or not math.isfinite(p) or p > guard.broken_perplexity_ratio * base["perplexity"]


def _conversation_batch(engine: Any, conversations: Sequence[Sequence[str]], max_tokens: int, n_seq: int) -> Any:
    """A batch on the engine's model and threads, each sequence long enough for a whole
    conversation (its user turns, every answer at full length and the template's tokens)."""
    framing = len(engine.prompt([{"role": "user", "content": ""}])[0])  # system prompt + a turn's markup
    longest = max(sum(len(engine.tokenize(text)) + framing for text in turns) + len(turns) * max_tokens
                  for turns in conversations) + 64  # slack: an answer may re-tokenize longer
    n_ctx = min(longest, engine.n_ctx)
    # The search asks both sides at once.
    n_seq = n_seq or sequences_within(engine.model, min(2 * len(conversations), 16), n_ctx)
    batch = Batch(engine.model, n_seq=n_seq, n_ctx=n_ctx, n_threads=engine.n_threads)
    batch.keep_logprobs = True  # multiplier 0's answers are scored as they are sampled
    return batch


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
