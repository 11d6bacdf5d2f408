"""The paper's further experiments, each a function returning a result with its own table and JSON.

- :func:`transfer_vector`: one layer's direction applied at other layers (the paper's
  "layer-13 vector at every layer" figure); evaluate it with ``ab_sweep``.
- :func:`capability_by_category`: MMLU / TruthfulQA p(correct) per category and multiplier.
- :func:`layer_similarity`: cosine of two vectors layer by layer (base- vs chat-model vectors).
- :func:`token_similarity`: cosine of a vector with every token's activation in a prompt (torch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError, ModelMismatchError
from caa_local.core.vector import ControlVector

if TYPE_CHECKING:
    from caa_local.core.templates import ChatTemplate
    from caa_local.engine.engine import Engine


def transfer_vector(vector: ControlVector, from_layer: int, layers: Sequence[int]) -> ControlVector:
    """A vector holding ``vector``'s layer-``from_layer`` direction at each of ``layers``."""
    if from_layer not in vector.directions:
        raise CaaError(f"--from-layer {from_layer}: the vector has no direction there (it holds {vector.layers})")
    if not layers:
        raise CaaError("no layers to apply the vector at")
    direction = vector.directions[from_layer]
    meta = {**vector.metadata, "transferred_from_layer": str(from_layer)}
    meta.pop("recommended_layer", None)
    return ControlVector(vector.model_hint, {layer: direction for layer in layers}, meta)


# -- capability per category ---------------------------------------------------------------------
@dataclass
class CapabilityResult:
    """p(correct) per category x multiplier for one capability set ("mmlu", "truthfulqa")."""

    name: str
    layer: int
    multipliers: list[float]
    categories: list[str]
    p_correct: npt.NDArray[np.float64]  # (multiplier, question)
    question_category: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.question_category)

    def by_category(self) -> dict[str, list[float]]:
        cats = np.asarray(self.question_category)
        return {c: [float(row[cats == c].mean()) for row in self.p_correct] for c in self.categories}

    def overall(self) -> list[float]:
        return [float(row.mean()) for row in self.p_correct]

    def counts(self) -> dict[str, int]:
        return {c: self.question_category.count(c) for c in self.categories}

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
                "overall": self.overall(), "by_category": self.by_category(), "counts": self.counts(), **self.info}


def capability_by_category(
    engine: Engine,
    name: str,
    vector: ControlVector,
    layer: int,
    multipliers: Sequence[float],
    limit: int | None = None,
    progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> CapabilityResult:
    """p(correct answer) on "mmlu" / "truthfulqa" per category (the paper's capability tables).

    ``limit`` keeps the first N questions of every category, so each category stays represented.
    """
    from caa_local.core.datasets import load_capability
    from caa_local.core.templates import user_turn
    from caa_local.engine.scoring import Choice
    from caa_local.eval.ab import sweep_choices

    items = load_capability(name)
    if limit:
        seen: dict[str, int] = {}
        kept = []
        for it in items:
            if seen.get(it.category, 0) < limit:
                seen[it.category] = seen.get(it.category, 0) + 1
                kept.append(it)
        items = kept
    choices = [Choice(tuple(user_turn(it.prompt)), it.correct[1], it.incorrect[1]) for it in items]
    result = sweep_choices(engine, vector, choices, [layer], multipliers, progress, force)
    categories = sorted({it.category for it in items})
    return CapabilityResult(name, layer, list(result.multipliers), categories, result.p_match[0],
                            [it.category for it in items])


# -- vector similarity across layers -------------------------------------------------------------
@dataclass
class LayerSimilarity:
    """Cosine of two vectors at every layer both hold (e.g. base- vs chat-model vectors)."""

    names: tuple[str, str]
    layers: list[int]
    cosine: list[float]

    def table(self) -> str:
        lines = [f"| layer | cos({self.names[0]}, {self.names[1]}) |", "|---|---|"]
        lines += [f"| {layer} | {c:+.3f} |" for layer, c in zip(self.layers, self.cosine)]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"vectors": list(self.names), "layers": self.layers, "cosine": self.cosine}


def layer_similarity(a: ControlVector, b: ControlVector, names: tuple[str, str] = ("a", "b")) -> LayerSimilarity:
    """Per shared layer, cosine(a[L], b[L]); the two must come from models of one n_embd."""
    if a.n_embd != b.n_embd:
        raise ModelMismatchError(f"{names[0]} has n_embd {a.n_embd}, {names[1]} has {b.n_embd}: "
                                 "vectors of different models cannot be compared")
    layers = sorted(set(a.layers) & set(b.layers))
    if not layers:
        raise CaaError(f"{names[0]} and {names[1]} share no layer ({a.layers} vs {b.layers})")
    cos = []
    for layer in layers:
        x, y = a.directions[layer].astype(np.float64), b.directions[layer].astype(np.float64)
        denom = np.linalg.norm(x) * np.linalg.norm(y)
        cos.append(float(x @ y / denom) if denom > 0 else 0.0)
    return LayerSimilarity(names, layers, cos)


# -- per-token similarity --------------------------------------------------------------------------
@dataclass
class TokenSimilarity:
    """Cosine of a vector's layer-L direction with the block-L output at every token."""

    layer: int
    tokens: list[str]
    cosine: list[float]
    steer_from: int  # first token the paper's position mask would steer

    def table(self) -> str:
        lines = ["| # | token | cosine |", "|---|---|---|"]
        for i, (tok, c) in enumerate(zip(self.tokens, self.cosine)):
            mark = " (steered from here)" if i == self.steer_from else ""
            lines.append(f"| {i} | `{tok!r}`{mark} | {c:+.3f} |")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "tokens": self.tokens, "cosine": self.cosine, "steer_from": self.steer_from}


def token_similarity(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    vector: ControlVector,
    layer: int,
    prompt: str,
    answer: str = "",
) -> TokenSimilarity:
    """The paper's per-token view: how much each token's residual stream points along the vector.

    ``prompt`` goes through the chat template as a user turn; ``answer`` (optional) is written
    into the assistant turn as the template joins it.
    """
    import torch

    from caa_local.core.templates import instruction_end, user_turn
    from caa_local.torch.steer import block_outputs

    if layer not in vector.directions:
        raise CaaError(f"layer {layer}: the vector has no direction there (it holds {vector.layers})")
    n_layer = int(model.config.num_hidden_layers)
    vector.check_fits(int(model.config.hidden_size), n_layer, "vector")
    messages = user_turn(prompt)
    prompt_ids = list(tokenizer(template.render(messages), add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(template.render_answer(messages, answer), add_special_tokens=False)["input_ids"])
    outputs = block_outputs(model, torch.tensor([ids]))[layer, 0].double().numpy()
    direction = vector.directions[layer].astype(np.float64)
    norms = np.linalg.norm(outputs, axis=1) * np.linalg.norm(direction)
    cos = np.divide(outputs @ direction, norms, out=np.zeros(len(ids)), where=norms > 0)
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    return TokenSimilarity(layer, [str(p) for p in pieces], [float(c) for c in cos], instruction_end(prompt_ids, ids))
