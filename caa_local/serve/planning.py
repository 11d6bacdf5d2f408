"""Turn a request into a Plan: steering terms, sampling, the prompt's tokens, all checked.

Everything a request can get wrong is found here, before it queues for a slot, and raised as
one ApiError naming the parameter (``steering[1].layers``, ``max_tokens``, ...). ``plan`` takes
plain values (an ``Ask``), so every API the server speaks plans the same way; the prompt is
rendered and tokenized here once, and its tokens travel with the Plan to the slot. Planning is
CPU work (template, tokenizer): the app runs it on a worker thread, never on the event loop.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from caa_local.core.condition import Condition
from caa_local.core.gating import ConditionCheck
from caa_local.core.errors import CaaError
from caa_local.core.layers import check_vector_layers, parse_layer_spec
from caa_local.core.steering import SteeringTerm, default_layers
from caa_local.core.templates import Message
from caa_local.engine.engine import Engine, Sampling
from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import ApiError
from caa_local.serve.library import VectorLibrary
from caa_local.serve.limits import MAX_STOPS
from caa_local.serve.protocol import ChatCompletionRequest, SteeringItem

DEFAULT_SAMPLING = Sampling()  # top_k / min_p defaults when a request sets none


@dataclass(frozen=True)
class Plan:
    """One validated request, in native types: what a slot's worker thread needs."""

    sampling: Sampling
    terms: list[SteeringTerm]
    positions: str
    tokens: list[int]  # the rendered, tokenized prompt
    steer_from: int  # positions before this one are decoded unsteered
    stops: tuple[str, ...] = ()
    check: ConditionCheck | None = None  # what the terms with conditions decide on (CAST)


@dataclass(frozen=True)
class Ask:
    """A request's plain values, whichever API it came through (None: the server's default)."""

    messages: list[Message]
    steering: Optional[Sequence[SteeringItem]] = None
    positions: Optional[str] = None
    stops: Sequence[str] = ()
    max_tokens: Optional[int] = None
    max_tokens_param: str = "max_tokens"  # how the API names it, for errors
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repeat_penalty: Optional[float] = None
    seed: Optional[int] = None


@dataclass(frozen=True)
class Defaults:
    """What a request that says nothing about steering gets (the --vector options)."""

    terms: tuple[SteeringTerm, ...] = ()
    positions: str = "response"


def steering_echo(terms: Sequence[SteeringTerm]) -> list[dict[str, Any]]:
    # A vector named twice in one request gets the term name "id#i"; the echo gives the id back.
    return [{"vector": t.name.split("#")[0], "scale": t.scale, "layers": list(t.layers),
             "describe": t.describe(),
             **({"when": [{"condition": c.name, "threshold": c.threshold, "comparison": c.comparison,
                           "invert": c.invert, "layer": c.layer} for c in t.conditions]} if t.conditions else {})}
            for t in terms]


def conditions_of(engine: Engine, library: VectorLibrary, item: SteeringItem, where: str) -> list[Condition]:
    """The item's `when` conditions, looked up by id and checked against the model."""
    out = []
    for j, when in enumerate(item.conditions()):
        param = f"{where}.when[{j}]"
        entry = library.get(when.condition, param)
        try:
            out.append(engine.make_condition(entry.name, entry.vector, when.threshold, when.invert))
        except CaaError as err:
            raise ApiError(f"{param}: {err}", "invalid_request", param, "invalid_condition") from None
    return out


def parse_layers(value: str | int | list[int] | None, n_layer: int, param: str) -> list[int] | None:
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return parse_layer_spec(value, n_layer)
        return list(value) if isinstance(value, list) else [value]
    except CaaError as err:
        raise ApiError(f"{param}: {err}", "invalid_request", param, "invalid_layers") from None


def make_terms(engine: Engine, library: VectorLibrary, items: Sequence[SteeringItem],
               config: ServeConfig) -> list[SteeringTerm]:
    if len(items) > config.max_steering_terms:
        raise ApiError(f"steering: at most {config.max_steering_terms} terms, got {len(items)}",
                       "invalid_request", "steering")
    terms: list[SteeringTerm] = []
    used: set[str] = set()
    for i, item in enumerate(items):
        where = f"steering[{i}]"
        entry = library.get(item.vector, f"{where}.vector")
        if entry.vector.kind == "condition":
            raise ApiError(f"{where}.vector: {entry.name!r} is a condition, not a behavior vector (use it in 'when')",
                           "invalid_request", f"{where}.vector", "invalid_vector")
        conditions = conditions_of(engine, library, item, where)
        if not math.isfinite(item.scale) or abs(item.scale) > config.max_scale:
            raise ApiError(f"{where}.scale: expected a finite number within ±{config.max_scale:g}, got {item.scale!r}",
                           "invalid_request", f"{where}.scale", "scale_out_of_range")
        layers = parse_layers(item.layers, engine.n_layer, f"{where}.layers")
        try:
            chosen = check_vector_layers(layers, entry.vector.layers, engine.n_layer) if layers is not None \
                else list(default_layers(entry.vector))
            name = entry.name if entry.name not in used else f"{entry.name}#{i}"
            used.add(name)
            terms.append(engine.make_term(name, entry.vector, item.scale, chosen).with_conditions(conditions))
        except CaaError as err:
            raise ApiError(f"{where}.layers: {err}", "invalid_request", f"{where}.layers", "invalid_layers") from None
    return terms


def messages_of(request: ChatCompletionRequest) -> list[dict[str, str]]:
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in request.messages]


def refuse_unsupported(request: ChatCompletionRequest) -> None:
    """Fields we parse but cannot honour get a 400 instead of being silently ignored."""
    if request.n not in (None, 1):
        raise ApiError("n: only one choice per request is supported", "invalid_request", "n")
    if request.logprobs:
        raise ApiError("logprobs: not supported by this server", "invalid_request", "logprobs")
    if request.tools:
        raise ApiError("tools: tool calls are not supported by this server", "invalid_request", "tools")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(request, name):
            raise ApiError(f"{name}: not supported; use repeat_penalty (llama.cpp's repetition penalty)",
                           "invalid_request", name)


def stops_of(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", "invalid_request", "stop")
    return tuple(s for s in stops if s)


def ask_of(request: ChatCompletionRequest) -> Ask:
    """The plain values of an OpenAI chat request (refusing the fields we cannot honour)."""
    refuse_unsupported(request)
    return Ask(
        messages=messages_of(request), steering=request.steering, positions=request.steering_positions,
        stops=stops_of(request.stop), max_tokens=request.max_completion_tokens or request.max_tokens,
        max_tokens_param="max_completion_tokens" if request.max_completion_tokens else "max_tokens",
        temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
        repeat_penalty=request.repeat_penalty, seed=request.seed)


def plan(ask: Ask, engine: Engine, library: VectorLibrary, config: ServeConfig, defaults: Defaults,
         n_ctx: int) -> Plan:
    """Check everything in ``ask`` against the model and the server's limits; render and tokenize once."""
    if len(ask.messages) > config.max_messages:
        raise ApiError(f"messages: at most {config.max_messages} messages, got {len(ask.messages)}",
                       "invalid_request", "messages")
    if ask.steering is None:
        terms, positions = list(defaults.terms), defaults.positions
    else:
        terms, positions = make_terms(engine, library, ask.steering, config), config.positions
    positions = ask.positions or positions
    try:
        tokens, steer_from = engine.prompt(ask.messages, positions=positions)
    except CaaError as err:
        raise ApiError(f"messages: {err}", "invalid_request", "messages") from None
    try:
        check = engine.condition_check(ask.messages, tokens, steer_from, terms)
    except CaaError as err:
        raise ApiError(f"steering: {err}", "invalid_request", "steering", "invalid_condition") from None
    room = n_ctx - len(tokens)
    asked = ask.max_tokens
    if room < 1:
        raise ApiError(f"messages: the prompt is {len(tokens)} tokens, the context holds {n_ctx} "
                       "(start the server with a larger --ctx)", "context_length", "messages",
                       "context_length_exceeded")
    if asked is not None and asked > room:
        raise ApiError(f"{ask.max_tokens_param}: {asked} tokens do not fit: the prompt is {len(tokens)} tokens "
                       f"and the context holds {n_ctx} (at most {room})", "context_length", ask.max_tokens_param,
                       "context_length_exceeded")
    sampling = Sampling(
        temperature=1.0 if ask.temperature is None else ask.temperature,
        top_p=1.0 if ask.top_p is None else ask.top_p,
        top_k=DEFAULT_SAMPLING.top_k if ask.top_k is None else ask.top_k,
        min_p=DEFAULT_SAMPLING.min_p if ask.min_p is None else ask.min_p,
        repeat_penalty=1.0 if ask.repeat_penalty is None else ask.repeat_penalty,
        seed=secrets.randbits(32) if ask.seed is None else ask.seed,
        max_tokens=asked if asked is not None else min(config.default_max_tokens, room),
    )
    return Plan(sampling, terms, positions, tokens, steer_from, tuple(ask.stops), check)


def plan_request(request: ChatCompletionRequest, engine: Engine, library: VectorLibrary, config: ServeConfig,
                 defaults: Defaults, n_ctx: int) -> Plan:
    return plan(ask_of(request), engine, library, config, defaults, n_ctx)
