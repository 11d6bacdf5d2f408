"""The transformers reference of the A/B scores: each full prompt + answer through the model
with torch_steer's hooks, one forward pass per (question, answer, layer, multiplier).

``caa_local.eval.ab.ab_sweep_torch`` turns these log-probabilities into a sweep result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from caa_local.core.positions import check_positions
from caa_local.core.templates import ChatTemplate, Message, instruction_end, shared_prefix
from caa_local.core.vector import ControlVector
from caa_local.torch.steer import steer

Question = tuple[Sequence[Message], tuple[str, str]]  # messages, (matching letter, not matching)


def answer_logprobs(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    vector: ControlVector,
    questions: Sequence[Question],
    layers: Sequence[int],
    multipliers: Sequence[float],
    positions: str = "response",
    progress: Callable[[int], None] | None = None,
) -> npt.NDArray[np.float64]:
    """log p(answer continuation up to its letter) per (layer, multiplier, question, answer):
    an array of shape (len(layers), len(multipliers), len(questions), 2). Multiplier 0 is
    computed once per answer and shared by every layer."""
    check_positions(positions)
    logp = np.zeros((len(layers), len(multipliers), len(questions), 2))

    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_logp(tokens: list[int], n_scored: int, steer_from: int, layer: int, mult: float) -> float:
        hooks = (contextlib.nullcontext() if mult == 0.0
                 else steer(model, vector, mult, [layer], from_position=steer_from))
        with hooks, torch.inference_mode():
            logits = model(input_ids=torch.tensor([tokens])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        return float(sum(logprobs[j - 1, tokens[j]] for j in range(len(tokens) - n_scored, len(tokens))))

    for q, (messages, letters) in enumerate(questions):
        prompt_ids = ids(template.render(messages, add_generation_prompt=True))
        for o, letter in enumerate(letters):
            tokens = ids(template.render_answer(messages, "(" + letter))
            n_scored = len(tokens) - shared_prefix(prompt_ids, tokens)
            steer_from = 0 if positions == "all" else instruction_end(prompt_ids, tokens)
            base = None
            for i, layer in enumerate(layers):
                for j, mult in enumerate(multipliers):
                    if mult == 0.0 and base is not None:
                        logp[i, j, q, o] = base
                        continue
                    logp[i, j, q, o] = answer_logp(tokens, n_scored, steer_from, layer, mult)
                    if mult == 0.0:
                        base = logp[i, j, q, o]
        if progress:
            progress(1)
    return logp
