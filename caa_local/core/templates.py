"""Chat templates, and the one definition of "the end of the user's instruction".

Prompts always go through the model's own Jinja chat template (stored in the GGUF as
``tokenizer.chat_template``, or in a Hugging Face tokenizer), rendered the way transformers
renders it, so the native engine and the torch reference see the same text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypedDict

from caa_local.core.errors import CaaError

# llama.cpp's own fallback when a model has no template (llama_chat_apply_template's default).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class Message(TypedDict):
    role: str
    content: str


class TemplateError(CaaError):
    """The chat template failed to render these messages."""


@functools.lru_cache(maxsize=8)
def _compile(source: str):  # noqa: ANN202 - jinja2 Template
    from jinja2.exceptions import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"chat template: {message}")

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except JinjaError as err:
        raise TemplateError(f"chat template does not compile: {err}") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat template with the special-token strings it refers to."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        from jinja2.exceptions import TemplateError as JinjaError

        try:
            return _compile(self.source).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except JinjaError as err:
            raise TemplateError(f"chat template failed: {err}") from None


def user_turn(question: str, system: str | None = None) -> list[Message]:
    messages: list[Message] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": question})
    return messages


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two token sequences have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def instruction_end(prompt_tokens: Sequence[int], full_tokens: Sequence[int]) -> int:
    """Position of the token that ends the user's instruction in ``full_tokens``.

    ``prompt_tokens`` tokenizes the chat-templated prompt up to the opened assistant turn
    (``add_generation_prompt=True``); ``full_tokens`` tokenizes that text plus whatever follows
    (an answer prefix like ``(A``, or nothing). The instruction ends at the prompt's last token
    (``[/INST]``'s last token for Llama-2, the newline after ``<|im_start|>assistant`` for
    ChatML): steering covers this position and every later one, as in the paper. Where the
    tokenizer merges across the boundary, the last token shared by both tokenizations counts.
    """
    shared = shared_prefix(prompt_tokens, full_tokens)
    if shared == 0:
        raise TemplateError("the prompt and its continuation share no tokens")
    return min(shared, len(prompt_tokens)) - 1


def drop_oldest_exchange(messages: list[Message]) -> bool:
    """Remove the oldest user message and its answer (never the system or the last message)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users or users[0] == len(messages) - 1:
        return False
    first = users[0]
    end = first + 2 if first + 1 < len(messages) - 1 and messages[first + 1]["role"] == "assistant" else first + 1
    del messages[first:end]
    return True
