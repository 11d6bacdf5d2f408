"""The paper's per-token view: cosine of a vector's direction with the block output at every
token of a prompt (transformers; ``caa-local analyze tokens``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from caa_local.core.errors import CaaError
from caa_local.core.templates import ChatTemplate, instruction_end, user_turn
from caa_local.core.vector import ControlVector
from caa_local.torch.steer import block_outputs


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
