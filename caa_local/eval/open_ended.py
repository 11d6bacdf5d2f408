"""Open-ended evaluation: greedy answers to free-form prompts at every multiplier.

The answers are scored elsewhere: judge-free metrics in ``caa_local.eval.metrics``, a local judge
model in ``caa_local.eval.judge``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from caa_local.engine.engine import Engine, Sampling
from caa_local.core.errors import CaaError
from caa_local.core.layers import check_vector_layers
from caa_local.core.steering import check_multipliers
from caa_local.core.templates import user_turn
from caa_local.core.vector import ControlVector

Progress = Callable[[int], None]


def open_ended(
    engine: Engine,
    vector: ControlVector,
    layer: int,
    multipliers: Sequence[float],
    prompts: Sequence[str],
    max_tokens: int = 128,
    seed: int = 0,
    progress: Progress | None = None,
    force: bool = False,
    repeat_penalty: float = 1.1,
) -> list[dict[str, Any]]:
    """Greedy answers to every prompt at every multiplier (one row each)."""
    unit = engine.make_term("eval", vector, 1.0, any_arch=force)  # the vector's one validation
    check_vector_layers([layer], vector.layers, engine.n_layer)
    unit = dataclasses.replace(unit, layers=(layer,))
    multipliers = check_multipliers(multipliers)
    if not prompts:
        raise CaaError("no prompts to answer")
    # Greedy as in the paper, with a mild repetition penalty: small models loop otherwise.
    sampling = Sampling(temperature=0.0, seed=seed, max_tokens=max_tokens, repeat_penalty=repeat_penalty)
    rows: list[dict[str, Any]] = []
    for mult in multipliers:
        with engine.steered([unit.with_scale(mult)] if mult != 0.0 else []):
            for prompt in prompts:
                result = engine.generate(user_turn(prompt), sampling)
                rows.append({"prompt": prompt, "multiplier": mult, "layer": layer, "answer": result.text})
                if progress:
                    progress(1)
    return rows
