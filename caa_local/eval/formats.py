"""Prompt formats for evaluations: the model's template, a named or file template, or the paper's base format.

The engine reads the GGUF's template; evaluations that must match the paper exactly set it
here (``--format base``, ``--chat-template``), and refuse a model with no template rather
than score it in a format it never saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from caa_local.core.templates import ChatTemplate, resolve_template

if TYPE_CHECKING:
    from caa_local.engine.engine import Engine

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


def use_format(engine: Engine, chat_template: str | None = None, fmt: str = "chat") -> ChatTemplate:
    """Set ``engine.template`` from --chat-template/--format (errors if the model has none)."""
    meta = getattr(engine, "meta", None) or engine.session.meta
    current = engine.template
    engine.template = resolve_template(meta("tokenizer.chat_template"), chat_template, fmt,
                                       current.bos_token, current.eos_token, engine.model_path.name)
    return engine.template


def hf_template(tokenizer: Any, chat_template: str | None = None, fmt: str = "chat", where: str = "model") -> ChatTemplate:
    """The same choice for a Hugging Face tokenizer (the torch backend)."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one
        source = source.get("default") or next(iter(source.values()), None)
    return resolve_template(source, chat_template, fmt, tokenizer.bos_token or "", tokenizer.eos_token or "", where)
