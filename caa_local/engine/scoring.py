"""A/B scoring as the paper defines it, fast: each prompt's unsteered prefix is decoded once.

p(match) = p(matching answer) / (p(matching) + p(not matching)), where an answer's
probability is that of its whole continuation up to and including the letter (``(A``), so
tokenizers that merge ``(A`` into one token stay correct (design notes §1). With the
paper's position mask everything before the end of the instruction is unsteered: the
native Scorer keeps that prefix's KV and decodes only the steered tail per setting, all
questions of a chunk in one batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError
from caa_local.core.positions import check_positions
from caa_local.core.steering import Steering, SteeringTerm
from caa_local.core.templates import Message, shared_prefix, user_turn
from caa_local.engine import _native
from caa_local.engine.engine import Engine

KV_BUDGET_BYTES = 512 << 20


@dataclass(frozen=True)
class Choice:
    """One question with the two answers to compare, e.g. letters 'A' (matching) and 'B'."""

    messages: tuple[Message, ...]
    matching: str
    not_matching: str


def choices_from_items(items: Sequence[object], system: str | None = None) -> list[Choice]:
    """ABItem-like (question, matching_letter, not_matching_letter) -> Choice."""
    return [
        Choice(tuple(user_turn(item.question, system)), item.matching_letter, item.not_matching_letter)  # type: ignore[attr-defined]
        for item in items
    ]


@dataclass(frozen=True)
class ABScores:
    """Per-question log-probabilities of the matching and not-matching continuations."""

    logp_matching: npt.NDArray[np.float64]
    logp_not_matching: npt.NDArray[np.float64]

    @property
    def p_match(self) -> npt.NDArray[np.float64]:
        """Per question: p(matching) / (p(matching) + p(not matching))."""
        return 1.0 / (1.0 + np.exp(self.logp_not_matching - self.logp_matching))

    @property
    def option_mass(self) -> npt.NDArray[np.float64]:
        """Per question: probability the model puts on the two answers together."""
        return np.exp(self.logp_matching) + np.exp(self.logp_not_matching)

    @property
    def logit_diff(self) -> npt.NDArray[np.float64]:
        return self.logp_matching - self.logp_not_matching


@dataclass
class _Prepared:
    prefix: list[int]
    continuations: list[list[int]]  # matching, not matching
    n_scored: list[int]


def _prepare(engine: Engine, choice: Choice) -> _Prepared:
    full: list[list[int]] = []
    starts: list[int] = []
    n_scored: list[int] = []
    prompt_tokens, _ = engine.prompt(choice.messages)
    for letter in (choice.matching, choice.not_matching):
        tokens, steer_from = engine.prompt(choice.messages, "(" + letter)
        full.append(tokens)
        starts.append(steer_from)
        n_scored.append(len(tokens) - shared_prefix(prompt_tokens, tokens))
    start = min(starts)
    if full[0][:start] != full[1][:start]:
        raise CaaError("the two answers' prompts differ before the end of the instruction")
    if min(n_scored) < 1:
        raise CaaError("an answer continuation tokenized to nothing")
    return _Prepared(full[0][:start], [t[start:] for t in full], n_scored)


def _chunks(prepared: list[_Prepared], budget_tokens: int, max_questions: int) -> list[list[int]]:
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, p in enumerate(prepared):
        need = len(p.prefix) + sum(len(c) for c in p.continuations)
        if current and (used + need > budget_tokens or len(current) >= max_questions):
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += need
    if current:
        chunks.append(current)
    return chunks


Setting = Sequence[SteeringTerm]  # the terms one score is taken under (empty: unsteered)
Buffer = tuple[npt.NDArray[np.float32], int, int]


def _buffers(engine: Engine, settings: Sequence[Setting]) -> list[Buffer | None]:
    """Each setting's steering buffer, every term checked against the model; a model whose
    architecture ignores control vectors is refused rather than scored flat."""
    out = [Steering(setting).buffer(engine.n_embd, engine.n_layer) for setting in settings]
    if any(buffer is not None for buffer in out):
        engine.require_steerable()
    return out


def score_ab(
    engine: Engine,
    choices: Sequence[Choice],
    settings: Sequence[Setting],
    positions: str = "response",
    progress: Callable[[int], None] | None = None,
    kv_budget_bytes: int = KV_BUDGET_BYTES,
) -> list[ABScores]:
    """Scores of every choice under every setting (one ABScores per setting).

    A setting is a sequence of steering terms (empty: unsteered), e.g.
    ``[(), (term.at(layer=13, scale=-1.0),), (term.at(layer=13, scale=1.0),)]``.
    ``positions="all"`` steers the whole prompt too, so nothing is reused: each setting then
    decodes every prompt in full, as the paper's reference code does. The engine's own
    steering is neither used nor changed.
    """
    check_positions(positions)
    if not choices:
        raise CaaError("no questions to score")
    prepared = [_prepare(engine, c) for c in choices]
    if positions == "all":
        prepared = [
            _Prepared([], [p.prefix + c for c in p.continuations], p.n_scored) for p in prepared
        ]
    packed = _buffers(engine, settings)
    budget_tokens = max(kv_budget_bytes // engine.model.kv_bytes_per_token, 512)
    logp = np.zeros((len(settings), len(prepared), 2))
    for chunk in _chunks(prepared, budget_tokens, _native.LLAMA_MAX_SEQ // 2):
        max_tail = max(len(c) for i in chunk for c in prepared[i].continuations)
        scorer = engine.scorer([prepared[i].prefix for i in chunk], 2, max_tail, keep=True)
        conts = [prepared[i].continuations for i in chunk]
        n_scored = [prepared[i].n_scored for i in chunk]
        for s, buffer in enumerate(packed):
            logp[s, chunk] = scorer.score(conts, n_scored) if buffer is None else scorer.score(conts, n_scored, *buffer)
        if progress:
            progress(len(chunk))
    return [ABScores(logp[s, :, 0], logp[s, :, 1]) for s in range(len(settings))]


def score_ab_naive(engine: Engine, choices: Sequence[Choice], setting: Setting,
                   positions: str = "response") -> ABScores:
    """The slow method: decode each full prompt + answer anew, one scored token at a time (the
    benchmark's baseline; tests check both against llama-cpp-python's own logits)."""
    check_positions(positions)
    _buffers(engine, [setting])
    # A context of its own: the engine's steering and KV cache stay as they are.
    context = engine.model.context(n_ctx=64, n_threads=engine.n_threads, n_batch=64)
    context.set_steering(setting)
    logp = np.zeros((len(choices), 2))
    for q, choice in enumerate(choices):
        p = _prepare(engine, choice)
        for o, cont in enumerate(p.continuations):
            tokens = p.prefix + cont
            steer_from = 0 if positions == "all" else len(p.prefix)
            for j in range(len(tokens) - p.n_scored[o], len(tokens)):
                logits = context.logits_after(tokens[:j], min(steer_from, j)).astype(np.float64)
                top = logits.max()
                logp[q, o] += logits[tokens[j]] - top - np.log(np.exp(logits - top).sum())
    return ABScores(logp[:, 0], logp[:, 1])


def answer_span(engine: Engine, messages: Sequence[Message], answer: str) -> tuple[list[int], int, int]:
    """The chat rendered with ``answer`` as the assistant's turn, where steering would start,
    and the first of the answer's tokens a perplexity scores (the instruction-end token after
    the prompt is not scored; ``len(tokens)``: nothing to score)."""
    prompt_tokens, _ = engine.prompt(messages)
    full, steer_from = engine.prompt(messages, answer)
    return list(full), steer_from, max(shared_prefix(prompt_tokens, full), steer_from + 1)


def perplexity(
    engine: Engine,
    prompts: Sequence[Sequence[Message]],
    answers: Sequence[str],
    chunk: int = 16,
) -> list[float]:
    """The unsteered model's perplexity of each answer after its chat prompt (NaN if empty).

    Batched with the native Scorer: the prefix up to the end of the instruction is decoded
    once per answer, then the answer (after the instruction-end token, which is not scored)
    in one pass, with no steering.
    """
    out = [math.nan] * len(answers)
    jobs = []
    for i, (messages, answer) in enumerate(zip(prompts, answers)):
        full, steer_from, first = answer_span(engine, messages, answer)
        if first < len(full):
            jobs.append((i, full[:steer_from], full[steer_from:], len(full) - first))
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        max_tail = max(len(j[2]) for j in part)
        scorer = engine.scorer([j[1] for j in part], 1, max_tail)
        logp = scorer.score([[j[2]] for j in part], [[j[3]] for j in part])
        for (i, _, _, n_scored), value in zip(part, logp[:, 0]):
            out[i] = float(math.exp(-value / n_scored))
    return out
