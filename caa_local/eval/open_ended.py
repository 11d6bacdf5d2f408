"""Open-ended evaluation: greedy answers to free-form prompts at every multiplier.

The answers are scored elsewhere: judge-free metrics in ``caa_local.eval.metrics``, a local judge
model in ``caa_local.eval.judge``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from caa_local.engine.batch import Conversation
from caa_local.engine.engine import Engine, Sampling
from caa_local.core.errors import CaaError
from caa_local.core.layers import check_vector_layers
from caa_local.core.steering import check_multipliers
from caa_local.core.templates import user_turn
from caa_local.core.vector import ControlVector

Progress = Callable[[int], None]
BATCH_SEQUENCES = 8  # sequences decoded together: past about 8, 2-4 cores gain little more


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
    batched: bool = True,
) -> list[dict[str, Any]]:
    """Greedy answers to every prompt at every multiplier (one row each). ``batched``: all of
    them decode together in one ``Batch`` (a steering per sequence), else one at a time."""
    unit = engine.make_term("eval", vector, 1.0, any_arch=force)  # the vector's one validation
    check_vector_layers([layer], vector.layers, engine.n_layer)
    unit = dataclasses.replace(unit, layers=(layer,))
    multipliers = check_multipliers(multipliers)
    if not prompts:
        raise CaaError("no prompts to answer")
    # Greedy as in the paper, with a mild repetition penalty: small models loop otherwise.
    sampling = Sampling(temperature=0.0, seed=seed, max_tokens=max_tokens, repeat_penalty=repeat_penalty)
    rows: list[dict[str, Any]] = []
    if batched:
        items = []
        for mult in multipliers:
            terms = (unit.with_scale(mult),) if mult != 0.0 else ()
            for prompt in prompts:
                tokens, steer_from = engine.prompt(user_turn(prompt))
                items.append(Conversation(tokens, steer_from, terms, sampling))
        longest = max(len(item.tokens) for item in items) + max_tokens + 1
        batch = engine.model.batch(n_seq=min(len(items), BATCH_SEQUENCES), n_ctx=min(longest, engine.n_ctx),
                                   n_threads=engine.n_threads)
        answers = iter(batch.run(items))
    for mult in multipliers:
        with engine.steered([unit.with_scale(mult)] if mult != 0.0 and not batched else []):
            for prompt in prompts:
                result = next(answers) if batched else engine.generate(user_turn(prompt), sampling)
                rows.append({"prompt": prompt, "multiplier": mult, "layer": layer, "answer": result.text})
                if progress:
                    progress(1)
    return rows
