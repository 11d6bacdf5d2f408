"""Chat templates, and the one definition of "the end of the user's instruction".

Prompts always go through the model's own Jinja chat template (stored in the GGUF as
``tokenizer.chat_template``, or in a Hugging Face tokenizer), rendered the way transformers
renders it, so the native engine and the torch reference see the same text.

An answer written into the assistant turn (the paper's ``(A``, a judge's ``Score:``) is
separated from the rendered prompt by whatever the template itself puts before an assistant
message's content (:meth:`ChatTemplate.answer_separator`): Llama-2's template writes
``' ' + content``, so the paper's ``[/INST] (A`` (``▁(`` then ``A``); ChatML, Llama-3,
Gemma and Qwen put the content right after the opened turn. The rule reads the template,
never the model's name. A model without a template gets no silent fallback
(:func:`resolve_template`); ``base`` is the paper's format for base models,
``Input: <question>\nResponse: (A``.
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


# The Llama-2 chat template as Meta's tokenizer_config.json ships it (older GGUF conversions lack it).
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# The paper's base-model format (its tokenize.py: "Input: {question}\nResponse: {answer}").
BASE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'].strip() + '\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ 'Input: ' + message['content'].strip() + '\nResponse:' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + '\n\n' }}{% endif %}{% endfor %}"
)
NAMED_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama2": LLAMA2, "base": BASE}
FORMATS = ("chat", "base")
_SENTINEL = "CAAANSWERSENTINEL"


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

    def answer_separator(self, messages: Sequence[Message]) -> str:
        """The text this template puts between the opened assistant turn and its content.

        Rendered, not guessed: the conversation with an assistant message, compared with the
        generation prompt. "" where the content follows the opened turn directly, or where the
        two renderings do not line up (the prompt then stays exactly as the model saw it).
        """
        return _separator(self.source, self.bos_token, self.eos_token, _freeze(messages))

    def render_answer(self, messages: Sequence[Message], answer: str) -> str:
        """The generation prompt followed by the start of an answer, as the template joins them."""
        prompt = self.render(messages, add_generation_prompt=True)
        return prompt + self.answer_separator(messages) + answer if answer else prompt


def _freeze(messages: Sequence[Message]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in messages)


@functools.lru_cache(maxsize=64)
def _separator(source: str, bos: str, eos: str, frozen: tuple[tuple[str, str], ...]) -> str:
    template = ChatTemplate(source, bos, eos)
    messages: list[Message] = [{"role": r, "content": c} for r, c in frozen]
    prompt = template.render(messages, add_generation_prompt=True)
    try:
        full = template.render([*messages, {"role": "assistant", "content": _SENTINEL}], add_generation_prompt=False)
    except TemplateError:
        return ""
    if not full.startswith(prompt):
        return ""
    rest = full[len(prompt):]
    at = rest.find(_SENTINEL)
    return rest[:at] if at > 0 else ""


def resolve_template(
    source: str | None,
    spec: str | None = None,
    fmt: str = "chat",
    bos_token: str = "",
    eos_token: str = "",
    where: str = "model",
) -> ChatTemplate:
    """The template to use: ``--format base``, else ``--chat-template NAME|FILE``, else the model's.

    ``source`` is the model's own template ("" or None when it has none). A model without
    one is an error naming the ways out, never a silent ChatML fallback: llama.cpp's default
    would score every question in a format the model never saw.
    """
    if fmt not in FORMATS:
        raise TemplateError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "base":
        if spec not in (None, "base"):
            raise TemplateError("--format base uses the paper's Input:/Response: format; drop --chat-template")
        return ChatTemplate(BASE, bos_token, eos_token)
    if spec:
        return ChatTemplate(_template_source(spec), bos_token, eos_token)
    if not source or not source.strip():
        raise TemplateError(
            f"{where}: has no chat template (tokenizer.chat_template); pass --chat-template FILE|NAME "
            f"(NAME one of {', '.join(NAMED_TEMPLATES)}; base: the paper's Input:/Response: format for a base model)"
        )
    return ChatTemplate(source, bos_token, eos_token)


def _template_source(spec: str) -> str:
    from pathlib import Path

    if spec in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TemplateError(
            f"--chat-template {spec!r}: not a file nor a known name ({', '.join(NAMED_TEMPLATES)})"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TemplateError(f"{path}: cannot read the chat template: {err}") from None
    if not text.strip():
        raise TemplateError(f"{path}: the chat template file is empty")
    _compile(text)
    return text


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
