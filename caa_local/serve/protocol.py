"""Request and response shapes of /v1/chat/completions (OpenAI's fields, then our extras).

Unknown top-level keys are accepted and logged as ignored (clients send many we do not use);
inside our own ``steering`` objects unknown keys fail, so a typo never passes silently.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

log = logging.getLogger("caa_local.serve")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class WhenItem(BaseModel):
    """A condition on a steering term (CAST): a condition id, optionally its threshold and "unless"."""

    model_config = ConfigDict(extra="forbid")
    condition: str = Field(description="A condition id from GET /v1/vectors (kind 'condition').")
    threshold: float | None = Field(default=None, allow_inf_nan=False,
                                    description="Overrides the calibrated threshold; finite.")
    invert: bool = Field(default=False, description="Apply the term unless the condition fires.")


class SteeringItem(BaseModel):
    """One vector at one scale, optionally on chosen layers (default: the vector's recommended one)."""

    model_config = ConfigDict(extra="forbid")
    vector: str = Field(description="A vector id from GET /v1/vectors (never a path).")
    scale: float = Field(allow_inf_nan=False, description="Multiplier; finite, within the server's bound.")
    layers: Union[str, int, list[int], None] = Field(
        default=None, description="'13', '10-14', '4,8', 'all', an int or a list; default: recommended layer.")
    when: Union[list[WhenItem], None] = Field(
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
    model: str = ""
    frequency_penalty: float | None = Field(default=None, allow_inf_nan=False)
    logprobs: bool | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, allow_inf_nan=False)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: Union[str, list[str], None] = None
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
            log.warning("request fields %s are present in the request but ignored", sorted(self.model_extra))
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
