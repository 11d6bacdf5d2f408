"""Generation protocols of the open-ended evaluations.

(The prompt format, ``--chat-template``/``--format base``, is chosen where the model is:
``Model.chat_template`` for a GGUF, ``caa_local.torch.hf.chat_template_of`` for transformers.)
"""

from __future__ import annotations

from dataclasses import dataclass

# Open-ended generation settings: the paper's (greedy, 100 new tokens, no repetition penalty)
# and the demo vectors' (a mild penalty: a 135M model loops without one).
@dataclass(frozen=True)
class OpenEndedProtocol:
    max_tokens: int
    repeat_penalty: float


PROTOCOLS = {"paper": OpenEndedProtocol(100, 1.0), "demo": OpenEndedProtocol(128, 1.1)}


def default_protocol(behavior: str | None) -> str:
    from caa_local.core.datasets import PAPER_BEHAVIORS

    return "paper" if behavior in PAPER_BEHAVIORS or behavior is None else "demo"
