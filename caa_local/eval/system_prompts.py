"""The paper's system-prompt experiment: p(match) under its pos/neg system prompts, with steering.

The paper (Rimsky et al. 2024, its behaviors.py) gives every behavior two system prompts:
"pos" elicits the behavior the dataset's matching answer shows, "neg" its opposite. Its
table compares what prompting alone does (multiplier 0) with what steering adds on top of
each prompt. :func:`system_prompt_baseline` is the unsteered part (also the calibration
baseline); :func:`system_prompt_table` crosses the prompts with multipliers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from caa_local.core.errors import CaaError
from caa_local.engine.scoring import choices_from_items, score_ab
from caa_local.eval.ab import steering_grid

if TYPE_CHECKING:
    from caa_local.core.datasets import ABItem
    from caa_local.core.vector import ControlVector
    from caa_local.engine.engine import Engine

PROMPT_NAMES = ("pos", "neg")


def paper_system_prompts(behavior: str) -> dict[str, str]:
    """{"pos": ..., "neg": ...} for a paper behavior (from the packaged protocol.json)."""
    from caa_local.core.datasets import load_protocol

    prompts = load_protocol()["system_prompts"]
    if behavior not in prompts:
        raise CaaError(f"no paper system prompts for {behavior!r} (known: {', '.join(prompts)})")
    return dict(prompts[behavior])


def resolve_system(spec: str | None, behavior: str | None) -> str | None:
    """``--system pos|neg|TEXT``: the paper's prompt for the behavior by name, else the text itself."""
    if spec is None or not spec.strip():
        return None
    if spec in PROMPT_NAMES:
        if behavior is None:
            raise CaaError(f"--system {spec}: the paper's prompts need a paper behavior as --dataset "
                           "(or pass the prompt text)")
        return paper_system_prompts(behavior)[spec]
    return spec


@dataclass
class SystemPromptTable:
    """p(match) per system prompt ("none", "pos", "neg") and multiplier at one layer."""

    behavior: str
    layer: int | None
    multipliers: list[float]
    prompts: dict[str, str]  # name -> text ("" for none)
    p_match: dict[str, list[float]]  # name -> one mean per multiplier
    info: dict[str, Any] = field(default_factory=dict)

    def value(self, prompt: str, multiplier: float) -> float:
        return self.p_match[prompt][self.multipliers.index(multiplier)]

    def to_json(self) -> dict[str, Any]:
        return {"behavior": self.behavior, "layer": self.layer, "multipliers": self.multipliers,
                "system_prompts": self.prompts, "p_match": self.p_match, **self.info}

    def table(self) -> str:
        """Markdown: one row per system prompt, one column per multiplier."""
        head = "| system prompt | " + " | ".join(f"x{m:+g}" for m in self.multipliers) + " |"
        lines = [head, "|---" * (len(self.multipliers) + 1) + "|"]
        for name, values in self.p_match.items():
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
        return "\n".join(lines)


def _sweep_means(engine: Engine, vector: ControlVector | None, items: Sequence[ABItem], layer: int | None,
                 multipliers: Sequence[float], system: str | None,
                 progress: Callable[[int], None] | None) -> list[float]:
    choices = choices_from_items(items, system)
    if vector is None or layer is None:
        scores = score_ab(engine, choices, [()], progress=progress)
        return [float(scores[0].p_match.mean())] * len(multipliers)
    unit = engine.make_term("vector", vector, 1.0, any_arch=True).at(layer=layer)
    settings, index = steering_grid([(layer, unit)], multipliers)
    scores = score_ab(engine, choices, settings, progress=progress)
    return [float(scores[index[(layer, m)]].p_match.mean()) for m in multipliers]


def system_prompt_baseline(
    engine: Engine,
    behavior: str,
    items: Sequence[ABItem],
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Unsteered p(match) with no system prompt, the paper's "pos" and its "neg" prompt.

    Returns {"none": p, "pos": p, "neg": p}: how far prompting alone moves the behavior.
    """
    if not items:
        raise CaaError("no questions to evaluate")
    prompts = {"none": "", **paper_system_prompts(behavior)}
    return {name: _sweep_means(engine, None, items, None, [0.0], text or None, progress)[0]
            for name, text in prompts.items()}


def system_prompt_table(
    engine: Engine,
    vector: ControlVector,
    behavior: str,
    items: Sequence[ABItem],
    layer: int,
    multipliers: Sequence[float],
    progress: Callable[[int], None] | None = None,
    force: bool = False,
) -> SystemPromptTable:
    """The paper's table: p(match) for {no, pos, neg} system prompt x multipliers at ``layer``."""
    from caa_local.core.layers import check_vector_layers
    from caa_local.core.steering import check_multipliers

    if not items:
        raise CaaError("no questions to evaluate")
    engine.make_term("vector", vector, 1.0, any_arch=force)  # shapes always; the architecture unless force
    check_vector_layers([layer], vector.layers, engine.n_layer)
    mults = check_multipliers(multipliers)
    prompts = {"none": "", **paper_system_prompts(behavior)}
    p_match = {name: _sweep_means(engine, vector, items, layer, mults, text or None, progress)
               for name, text in prompts.items()}
    return SystemPromptTable(behavior, layer, mults, prompts, p_match, {"n": len(items)})
