"""Request and response shapes of /v1/chat/completions (OpenAI's fields, then our extras).

Unknown top-level keys are accepted and logged as ignored (clients send many we do not use);
inside our own ``steering`` objects unknown keys fail, so a typo never passes silently.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from caa_local.serve.errors import clip
from caa_local.serve.limits import MAX_CONTENT_PARTS, MAX_LAYER_ITEMS, MAX_NAME_CHARS

log = logging.getLogger("caa_local.serve")

Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


MAX_WHEN_ITEMS = 8  # conditions OR-ed on one steering term


class WhenItem(BaseModel):
    """A condition on a steering term (CAST): a condition id, optionally its threshold and "unless"."""

    model_config = ConfigDict(extra="forbid")
    condition: Name = Field(description="A condition id from GET /v1/vectors (kind 'condition').")
    threshold: float | None = Field(default=None, allow_inf_nan=False,
                                    description="Overrides the calibrated threshold; finite.")
    invert: bool = Field(default=False, description="Apply the term unless the condition fires.")


class SteeringItem(BaseModel):
    """One vector at one scale, optionally on chosen layers (default: the vector's recommended one)."""

    model_config = ConfigDict(extra="forbid")
    vector: str = Field(max_length=MAX_NAME_CHARS, description="A vector id from GET /v1/vectors (never a path).")
    scale: float = Field(allow_inf_nan=False, description="Multiplier; finite, within the server's bound.")
    layers: Union[Name, int, Annotated[list[int], Field(max_length=MAX_LAYER_ITEMS)], None] = Field(
        default=None, description="'13', '10-14', '4,8', 'all', an int or a list; default: recommended layer.")
    when: Union[Annotated[list[WhenItem], Field(max_length=MAX_WHEN_ITEMS)], None] = Field(
        default=None, description="Apply this term only when the condition fires on the last user message: "
                                  "a condition id, a {condition, threshold, invert} object, or a list of them (OR).")

    @field_validator("when", mode="before")
    @classmethod
    def _when_list(cls, value: Any) -> Any:
        items = value if isinstance(value, list) else [] if value is None else [value]
        return [{"condition": w} if isinstance(w, str) else w for w in items] if value is not None else None

    def conditions(self) -> list[WhenItem]:
        return list(self.when or [])


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    # -- OpenAI's fields, in OpenAI's order --------------------------------------------------
    messages: list[ChatMessage] = Field(min_length=1)
    model: Name = ""
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    logprobs: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: Union[Name, list[Name], None] = None  # how many: planning.stops_of (a 400 naming the limit)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=10, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0, le=1, allow_inf_nan=False)
    tools: list[Any] | None = None

    # -- caa-local extras (the openai client sends them through extra_body) ----------------
    steering: list[SteeringItem] | None = Field(
        default=None, description="Vectors to steer this request with; [] for none; absent: the server default.")
    steering_positions: Literal["response", "all"] | None = Field(
        default=None, description="Steer only the answer (CAA's mask) or every token.")
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)
    min_p: float | None = Field(default=None, ge=0, le=1, allow_inf_nan=False)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10, allow_inf_nan=False,
                                         description="llama.cpp's repetition penalty; none unless asked.")

    @model_validator(mode="after")
    def _log_ignored(self) -> ChatCompletionRequest:
        if self.model_extra:
            names = sorted(self.model_extra)
            shown = ", ".join(clip(name, 40) for name in names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            log.warning("request fields %s are present in the request but ignored", shown)
        return self


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion_body(cid: str, created: int, model: str, text: str, finish: str, usage: dict[str, int],
                    steering: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage, "steering": steering,
    }


def chunk_body(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
               **extra: Any) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}


def now() -> int:
    return int(time.time())


def finish_reason(stop_reason: str, stopped_by_string: bool) -> str:
    """OpenAI's finish_reason: 'length' when the token budget or the context ran out, else 'stop'."""
    if stopped_by_string:
        return "stop"
    return "length" if stop_reason in ("max_tokens", "context") else "stop"


def usage(n_prompt: int, n_completion: int, n_cached: int) -> dict[str, Any]:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
            "prompt_tokens_details": {"cached_tokens": n_cached}}
