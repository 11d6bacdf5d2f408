"""Conditional activation steering (CAST; Lee et al., ICLR 2025; design.md §5d): numpy only.

A *condition vector* holds, per layer, a unit direction c found from prompts that have and
lack a condition. A prompt's hidden state h at the condition layer (the block output averaged
over the tokens of the last user message) gets CAST's score

    score = cos(h, tanh(P h)),   P = c c^T / (c^T c)

and the condition *fires* when the score is above (or below) a threshold. Layer, threshold and
comparison come from a grid search for F1 on held-out prompts (``best_point``). A steering term
with conditions applies to an answer only when one of them fires (OR; ``invert`` gives
"unless"); the decision is made from the unsteered prefix decode, before the first steered token.

Condition files are control-vector GGUFs with ``caa.kind = condition``; their calibration is
stored under ``caa.condition_*`` keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError, ModelMismatchError
from caa_local.core.templates import ChatTemplate, Message, shared_prefix
from caa_local.core.vector import ControlVector

KIND = "condition"
METHODS = ("pca", "mean-diff")
COMPARISONS = ("above", "below")
KEY_LAYER = "condition_layer"
KEY_THRESHOLD = "condition_threshold"
KEY_COMPARISON = "condition_comparison"
KEY_CALIBRATION = "condition_calibration"
Tokenize = Callable[[str], Sequence[int]]


class ConditionError(CaaError):
    """A condition that cannot be used as asked (wrong kind, not calibrated, bad threshold)."""


# -- the score ---------------------------------------------------------------------------------
def cast_score(hidden: npt.ArrayLike, direction: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """CAST's similarity of hidden states (..., n_embd) with their projection on ``direction``."""
    h = np.asarray(hidden, dtype=np.float64)
    c = np.asarray(direction, dtype=np.float64)
    projected = np.tanh(((h @ c) / (c @ c))[..., None] * c)
    denom = np.linalg.norm(h, axis=-1) * np.linalg.norm(projected, axis=-1)
    return np.divide(np.sum(h * projected, axis=-1), denom, out=np.zeros_like(denom), where=denom > 0)


def directions(matching: npt.ArrayLike, not_matching: npt.ArrayLike, method: str) -> npt.NDArray[np.float32]:
    """Unit directions per layer from reads (n, n_layers, n_embd) of each side, oriented so the
    matching prompts project higher. ``pca``: first principal component of all reads, centred
    (CAST's pca_center); ``mean-diff``: mean(matching) - mean(not matching)."""
    pos = np.asarray(matching, dtype=np.float64)
    neg = np.asarray(not_matching, dtype=np.float64)
    if pos.ndim != 3 or neg.ndim != 3 or pos.shape[1:] != neg.shape[1:] or not len(pos) or not len(neg):
        raise ValueError(f"reads {pos.shape} and {neg.shape}: expected (n, n_layers, n_embd) each")
    out = np.empty(pos.shape[1:], dtype=np.float64)
    for i in range(pos.shape[1]):
        if method == "mean-diff":
            d = pos[:, i].mean(axis=0) - neg[:, i].mean(axis=0)
        elif method == "pca":
            both = np.concatenate([pos[:, i], neg[:, i]])
            _, _, vt = np.linalg.svd(both - both.mean(axis=0), full_matrices=False)
            d = vt[0]
        else:
            raise CaaError(f"method {method!r}: expected one of {', '.join(METHODS)}")
        norm = np.linalg.norm(d)
        d = d / norm if norm > 0 else d
        if (pos[:, i] @ d).mean() < (neg[:, i] @ d).mean():
            d = -d
        out[i] = d
    return out.astype(np.float32)


# -- choosing a threshold ----------------------------------------------------------------------
def confusion(fired_matching: npt.ArrayLike, fired_not_matching: npt.ArrayLike) -> dict[str, Any]:
    """Confusion matrix and precision / recall / F1, the matching prompts being the positives."""
    pos = np.asarray(fired_matching, dtype=bool)
    neg = np.asarray(fired_not_matching, dtype=bool)
    tp, fn = int(pos.sum()), int((~pos).sum())
    fp, tn = int(neg.sum()), int((~neg).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": round(precision, 4),
            "recall": round(recall, 4), "f1": round(f1, 4)}


def fires(score: npt.ArrayLike, threshold: float, comparison: str) -> npt.NDArray[np.bool_]:
    s = np.asarray(score)
    return s > threshold if comparison == "above" else s < threshold


def best_point(matching: npt.ArrayLike, not_matching: npt.ArrayLike) -> tuple[float, str, dict[str, Any]]:
    """(threshold, comparison, confusion) with the highest F1 on these scores; the thresholds
    tried are the midpoints between neighbouring scores (every split the data allows)."""
    pos, neg = np.asarray(matching, dtype=np.float64), np.asarray(not_matching, dtype=np.float64)
    values = np.unique(np.concatenate([pos, neg]))
    candidates = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
    best: tuple[float, float, str, dict[str, Any]] | None = None
    for comparison in COMPARISONS:
        for threshold in candidates:
            result = confusion(fires(pos, threshold, comparison), fires(neg, threshold, comparison))
            margin = min(abs(pos - threshold).min(), abs(neg - threshold).min())
            key = (result["f1"], margin)
            if best is None or key > (best[3]["f1"], best[0]):
                best = (margin, float(threshold), comparison, result)
    assert best is not None
    return best[1], best[2], best[3]


# -- a condition to use ------------------------------------------------------------------------
def is_condition(vector: ControlVector) -> bool:
    return vector.kind == KIND


def require_condition(name: str, vector: ControlVector) -> None:
    if not is_condition(vector):
        raise ConditionError(f"{name}: is a behavior vector, not a condition (make one with "
                             "`caa-local condition extract`)")


def require_behavior(name: str, vector: ControlVector) -> None:
    if is_condition(vector):
        raise ConditionError(f"{name}: is a condition, not a behavior vector (use it with --when {name})")


@dataclass(frozen=True, eq=False)  # holds an array: equal by identity
class Condition:
    """One calibrated condition at its layer: fires when the score is above / below threshold
    (the reverse with ``invert``)."""

    name: str
    direction: npt.NDArray[np.float32]
    layer: int
    threshold: float
    comparison: str
    invert: bool = False

    def score(self, hidden: npt.ArrayLike) -> float:
        return float(cast_score(hidden, self.direction))

    def fires(self, score: float) -> bool:
        return bool(fires(score, self.threshold, self.comparison)) != self.invert

    def describe(self) -> str:
        """'when work (score < 0.107 @ layer 13)', or 'unless work (...)' when inverted."""
        sign = ">" if self.comparison == "above" else "<"
        return f"{'unless' if self.invert else 'when'} {self.name} (score {sign} {self.threshold:.4g} @ layer {self.layer})"


def make_condition(name: str, vector: ControlVector, n_embd: int, n_layer: int, architecture: str,
                   threshold: float | None = None, invert: bool = False, any_arch: bool = False) -> Condition:
    """A condition from its file, checked against the model; ``threshold`` overrides the calibrated one."""
    require_condition(name, vector)
    vector.check_fits(n_embd, n_layer, name)
    if vector.model_hint != architecture and not any_arch:
        raise ModelMismatchError(f"{name}: made for a {vector.model_hint!r} model, this one is {architecture!r} "
                                 "(use --any-arch if the shapes are meant to match)")
    meta = vector.metadata
    layer_text = meta.get(KEY_LAYER, "")
    comparison = meta.get(KEY_COMPARISON, "")
    if not layer_text.isdigit() or comparison not in COMPARISONS:
        raise ConditionError(f"{name}: not calibrated (run `caa-local calibrate {name}` to choose its layer, "
                             "threshold and comparison)")
    layer = int(layer_text)
    if layer not in vector.directions or layer > n_layer - 2:
        raise ConditionError(f"{name}: calibrated layer {layer} is not usable with this model (1..{n_layer - 2})")
    if threshold is None:
        try:
            threshold = float(meta.get(KEY_THRESHOLD, ""))
        except ValueError:
            threshold = math.nan
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConditionError(f"{name}: threshold must be a finite number, got {threshold!r}")
    return Condition(name, vector.directions[layer], layer, float(threshold), comparison, invert)


def calibration_of(vector: ControlVector) -> dict[str, Any] | None:
    try:
        value = json.loads(vector.metadata.get(KEY_CALIBRATION, ""))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- where a condition reads -----------------------------------------------------------------
def last_user_span(template: ChatTemplate, tokenize: Tokenize, messages: Sequence[Message],
                   tokens: Sequence[int]) -> tuple[int, int]:
    """(start, end) of the last user message's content in ``tokens`` (the prompt rendered with
    the generation prompt and tokenized); a token merged across a boundary counts as inside."""
    users = [m for m in messages if m["role"] == "user"]
    content = users[-1]["content"].strip() if users else ""
    if not content:
        raise ConditionError("a condition reads the last user message, and there is none (or it is empty)")
    text = template.render(messages, add_generation_prompt=True)
    at = text.rfind(content)
    if at < 0:
        raise ConditionError("the chat template changes the user's message: its tokens cannot be found in the prompt")
    start = shared_prefix(tokenize(text[:at]), tokens)
    end = shared_prefix(tokenize(text[: at + len(content)]), tokens)
    return start, max(end, start + 1)


def span_read(template: ChatTemplate, tokenize: Tokenize, prompt: str) -> tuple[list[int], int]:
    """A condition prompt as extraction reads it: its tokens up to the end of the user message
    and how many trailing ones are the message (their block outputs are averaged)."""
    messages: list[Message] = [{"role": "user", "content": prompt}]
    tokens = list(tokenize(template.render(messages, add_generation_prompt=True)))
    start, end = last_user_span(template, tokenize, messages, tokens)
    return tokens[:end], end - start
