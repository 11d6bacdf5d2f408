"""Ollama's API on the same server: /api/chat, /api/generate, /api/tags, /api/show, /api/version, /api/ps.

An Ollama request is translated into the OpenAI request model and goes through the same
planning (``plan_request``), presets, slots, queue and guard as /v1/chat/completions; only the
shapes differ: newline-delimited JSON streaming (``stream`` defaults to true), ``options`` for
sampling, a last object with ``done_reason``, counts and nanosecond durations, and errors as
``{"error": "..."}`` (``OllamaErrors`` flattens every error body under /api/, the guard's too).
What caa-local cannot do (images, tools, JSON ``format``, pulling models) is a clear 400/501.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import gguf
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, ValidationError

from caa_local import __version__
from caa_local.engine.engine import Engine
from caa_local.serve.app import (LeasedStream, generation_error, internal_error, off_loop, parse_request, reserve,
                                 run_until_disconnect)
from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import ApiError, validation_message
from caa_local.serve.limits import parse_json
from caa_local.serve.planning import Plan, plan_request, steering_echo
from caa_local.serve.presets import TAG, Preset, PresetBook
from caa_local.serve.protocol import finish_reason
from caa_local.serve.slots import Lease, Outcome, SlotPool

log = logging.getLogger("caa_local.serve")

# The Ollama API level these shapes follow (clients read it to decide what they may send).
API_VERSION = "0.9.0"
NDJSON = "application/x-ndjson"

# options key -> the OpenAI request field it sets
OPTION_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "num_predict": "max_tokens", "seed": "seed", "stop": "stop", "repeat_penalty": "repeat_penalty",
                 "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                 "steering": "steering", "steering_positions": "steering_positions"}
# options that change how a model is loaded or run, not the answer: accepted and ignored
RUNTIME_OPTIONS = frozenset({"num_thread", "num_gpu", "main_gpu", "use_mmap", "use_mlock", "numa", "num_batch",
                             "low_vram", "vocab_only", "f16_kv", "logits_all", "embedding_only", "num_keep",
                             "repeat_last_n", "penalize_newline", "num_gqa", "rope_frequency_base",
                             "rope_frequency_scale"})
# sampler options we do not implement: refused unless at their neutral value
NEUTRAL_OPTIONS = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0}
UNSUPPORTED_ENDPOINTS = (("POST", "/api/pull"), ("POST", "/api/push"), ("POST", "/api/create"),
                         ("POST", "/api/copy"), ("DELETE", "/api/delete"), ("POST", "/api/embed"),
                         ("POST", "/api/embeddings"), ("POST", "/api/blobs/{digest}"),
                         ("HEAD", "/api/blobs/{digest}"))


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str = ""
    images: list[Any] | None = None
    tool_calls: list[Any] | None = None


class OllamaRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = ""
    stream: bool = True
    options: dict[str, Any] | None = None
    format: Any = None
    keep_alive: Any = None
    think: Any = None
    tools: list[Any] | None = None
    steering: Any = None
    steering_positions: Any = None


class OllamaChat(OllamaRequest):
    messages: list[OllamaMessage] = []


class OllamaGenerate(OllamaRequest):
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    raw: bool = False
    suffix: str | None = None
    images: list[Any] | None = None
    context: list[int] | None = None


def timestamp() -> str:
    """RFC 3339 in UTC with a Z, as Ollama writes ``created_at``."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def parse_body(raw: bytes, shape: type[OllamaRequest]) -> Any:
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ApiError(f"request body must be a JSON object, got {type(data).__name__}", "invalid_request", None,
                       "invalid_json")
    try:
        return shape.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(list(err.errors()))
        raise ApiError(message, "validation", param) from None


def refuse_unsupported(body: OllamaRequest, messages: list[OllamaMessage]) -> None:
    if body.format not in (None, ""):
        raise ApiError("format: structured (JSON) output is not supported by this server; ask for JSON in the "
                       "prompt instead", "invalid_request", "format", "unsupported")
    if body.tools:
        raise ApiError("tools: tool calls are not supported by this server", "invalid_request", "tools", "unsupported")
    if body.think not in (None, False):
        raise ApiError("think: thinking mode is not supported by this server", "invalid_request", "think",
                       "unsupported")
    for i, message in enumerate(messages):
        if message.images:
            raise ApiError(f"messages[{i}].images: images are not supported (caa-local serves a text model)",
                           "invalid_request", f"messages[{i}].images", "unsupported")
        if message.tool_calls:
            raise ApiError(f"messages[{i}].tool_calls: tool calls are not supported by this server",
                           "invalid_request", f"messages[{i}].tool_calls", "unsupported")


def options_fields(body: OllamaRequest, n_ctx: int) -> tuple[dict[str, Any], dict[str, str], int]:
    """(OpenAI request fields, OpenAI param -> Ollama param, the context this request may use)."""
    fields: dict[str, Any] = {}
    names: dict[str, str] = {}
    options = body.options or {}
    for key, value in options.items():
        if value is None:
            continue
        where = f"options.{key}"
        if key in OPTION_FIELDS:
            target = OPTION_FIELDS[key]
            if key == "num_predict" and isinstance(value, int) and not isinstance(value, bool) and value in (-1, -2):
                continue  # unlimited / fill the context: the server's default budget, bounded by the context
            if key == "seed" and isinstance(value, int) and not isinstance(value, bool) and value == -1:
                continue  # Ollama's "random seed"
            fields[target], names[target] = value, where
        elif key in NEUTRAL_OPTIONS:
            if value != NEUTRAL_OPTIONS[key]:
                raise ApiError(f"{where}: not supported by this server (only {NEUTRAL_OPTIONS[key]!r})",
                               "invalid_request", where, "unsupported")
        elif key not in RUNTIME_OPTIONS and key != "num_ctx":
            log.warning("Ollama option %r is not known and was ignored", key)
    for key in ("steering", "steering_positions"):
        value = getattr(body, key)
        if value is not None:
            if key in fields:
                raise ApiError(f"{key}: given both at the top level and in options; give it once", "invalid_request",
                               key)
            fields[key], names[key] = value, key
    num_ctx = options.get("num_ctx")
    if num_ctx is None:
        return fields, names, n_ctx
    if isinstance(num_ctx, bool) or not isinstance(num_ctx, int) or not 1 <= num_ctx:
        raise ApiError(f"options.num_ctx: expected a positive integer, got {num_ctx!r}", "invalid_request",
                       "options.num_ctx")
    if num_ctx > n_ctx:
        raise ApiError(f"options.num_ctx: {num_ctx} is more than a slot's context of {n_ctx} tokens (start "
                       "caa-local serve with a larger --ctx)", "invalid_request", "options.num_ctx",
                       "context_length_exceeded")
    return fields, names, num_ctx


def renamed(err: ApiError, names: dict[str, str]) -> ApiError:
    """An error about an OpenAI field, reworded with the Ollama field the client sent."""
    head = re.match(r"[A-Za-z_]+", err.param or "")
    if head is None or head.group(0) not in names:
        return err
    param = names[head.group(0)] + (err.param or "")[head.end():]
    message = param + err.message[len(err.param or ""):] if err.message.startswith(err.param or "\0") \
        else err.message
    return ApiError(message, err.kind, param, err.code)


class OllamaErrors:
    """Under /api/, every error body becomes Ollama's ``{"error": "message"}`` (same status)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/api/"):
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] = {}
        body = bytearray()

        async def relay(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start.update(message)
                return
            if start and message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    await send_flat(send, start, bytes(body))
                return
            await send(message)

        await self.app(scope, receive, relay)


async def send_flat(send: Any, start: dict[str, Any], body: bytes) -> None:
    try:
        error = json.loads(body)["error"]
        flat = json.dumps({"error": error["message"] if isinstance(error, dict) else str(error)}).encode()
    except (ValueError, KeyError, TypeError):
        flat = body
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-length", b"content-type")]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(flat)).encode())]
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": flat})


def quantization(engine: Engine) -> str:
    value = engine.meta("general.file_type")
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")
    except ValueError:
        return ""


def mount(app: FastAPI, config: ServeConfig, engine: Engine, pool: SlotPool, book: PresetBook) -> None:
    """Add Ollama's routes and its error shape to ``app`` (built by ``create_app``)."""
    app.add_middleware(OllamaErrors)
    n_ctx = min(slot.engine.n_ctx for slot in pool.slots)
    stat = engine.model_path.stat()
    modified = datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat().replace("+00:00", "Z")
    arch = engine.architecture
    details = {"parent_model": "", "format": "gguf", "family": arch, "families": [arch],
               "parameter_size": engine.meta("general.size_label"), "quantization_level": quantization(engine)}

    def entry(name: str, preset: Preset | None) -> dict[str, Any]:
        spec = json.dumps(preset.describe() if preset else {}, sort_keys=True)
        digest = hashlib.sha256(f"{engine.model_path.name}\n{stat.st_size}\n{spec}".encode()).hexdigest()
        return {"name": name + TAG, "model": name + TAG, "modified_at": modified, "size": stat.st_size,
                "digest": digest, "details": {**details, "parent_model": book.model_id if preset else ""}}

    def entries() -> list[dict[str, Any]]:
        return [entry(book.model_id, None), *(entry(name, book.presets[name]) for name in sorted(book.presets))]

    @app.get("/api/version")
    async def version() -> dict[str, Any]:
        return {"version": API_VERSION, "server": f"caa-local {__version__}"}

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": entries()}

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        # Every name is served by the one model loaded at start-up, for as long as the server runs.
        return {"models": [{**e, "expires_at": "2999-01-01T00:00:00Z", "size_vram": 0, "context_length": n_ctx}
                           for e in entries()]}

    @app.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        body = parse_body(await request.body(), OllamaRequest)
        name = body.model or (body.model_extra or {}).get("name", "")
        if not isinstance(name, str) or not name:
            raise ApiError("model: the name of a model or preset is required", "invalid_request", "model")
        preset = book.resolve(name)
        defaults = book.defaults(preset)
        options = preset.options if preset else {}
        return {
            "modelfile": f"# caa-local: {engine.model_path.name}" + (f", preset {preset.name}" if preset else ""),
            "parameters": "\n".join(f"{k} {v}" for k, v in options.items()),
            "template": engine.template.source, "system": preset.spec.system if preset else None,
            "details": entry(preset.name if preset else book.model_id, preset)["details"],
            "model_info": {"general.architecture": arch, f"{arch}.block_count": engine.n_layer,
                           f"{arch}.embedding_length": engine.n_embd, f"{arch}.context_length": n_ctx},
            "capabilities": ["completion"], "modified_at": modified,
            "steering": steering_echo(defaults.terms), "steering_positions": defaults.positions,
        }

    def unsupported(method: str, path: str) -> None:
        async def refuse() -> Response:
            raise ApiError(f"{method} {path.split('/{')[0]}: not supported: caa-local serves the one model loaded "
                           "at start-up (add vectors with --vectors-dir and named steerings with --preset)",
                           "not_implemented", None, "unsupported")

        app.add_api_route(path, refuse, methods=[method], include_in_schema=False)

    for method, path in UNSUPPORTED_ENDPOINTS:
        unsupported(method, path)

    async def answer(request: Request, body: OllamaRequest, messages: list[dict[str, Any]],
                     names: dict[str, str], kind: str, started: int) -> Response:
        preset = book.resolve(body.model)
        fields, option_names, ctx = options_fields(body, n_ctx)
        names = {**names, **option_names}

        def make_plan() -> Plan:
            try:
                chat = parse_request(json.dumps({"model": body.model, "messages": messages, **fields}).encode())
                chat = book.apply(preset, chat)
                return plan_request(chat, engine, book.library, config, book.defaults(preset), ctx)
            except ApiError as err:
                raise renamed(err, names) from None

        plan = await off_loop(app, make_plan)
        lease = reserve(pool, plan)
        model = body.model or book.model_id
        echo = steering_echo(plan.terms)
        if body.stream:
            return LeasedStream(pool, lease, ndjson(pool, plan, lease, model, kind, started, echo),
                                media_type=NDJSON)
        try:
            outcome = await run_until_disconnect(pool, plan, lease, request)
        finally:
            pool.abandon(lease)
        if outcome is None:
            return Response(status_code=499)
        return JSONResponse({**piece_body(model, kind, outcome.text),
                             **final_fields(outcome, started), "steering": echo})

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await off_loop(app, parse_body, await request.body(), OllamaChat)
        book.resolve(body.model)
        refuse_unsupported(body, body.messages)
        if not body.messages:  # Ollama's "load the model" request: it is loaded
            return JSONResponse({**piece_body(body.model, "chat", ""), "done": True,
                                 "done_reason": "unload" if body.keep_alive == 0 else "load"})
        messages = [{"role": m.role, "content": m.content} for m in body.messages]
        return await answer(request, body, messages, {}, "chat", started)

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        started = time.perf_counter_ns()
        body = await off_loop(app, parse_body, await request.body(), OllamaGenerate)
        book.resolve(body.model)
        refuse_unsupported(body, [])
        for field, bad in (("images", bool(body.images)), ("raw", body.raw), ("template", bool(body.template)),
                           ("suffix", bool(body.suffix)), ("context", bool(body.context))):
            if bad:
                raise ApiError(f"{field}: not supported by this server (prompts always go through the model's own "
                               "chat template; use /api/chat for conversations)", "invalid_request", field,
                               "unsupported")
        if not body.prompt:
            return JSONResponse({**piece_body(body.model, "generate", ""), "done": True,
                                 "done_reason": "unload" if body.keep_alive == 0 else "load"})
        messages = ([{"role": "system", "content": body.system}] if body.system else []) + \
            [{"role": "user", "content": body.prompt}]
        names = {"messages": "prompt"}
        return await answer(request, body, messages, names, "generate", started)


def piece_body(model: str, kind: str, text: str) -> dict[str, Any]:
    content = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"response": text}
    return {"model": model, "created_at": timestamp(), **content, "done": False}


def final_fields(outcome: Outcome, started: int) -> dict[str, Any]:
    result = outcome.result
    return {"done": True, "done_reason": finish_reason(result.stop_reason, outcome.stopped_by_string),
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0, "prompt_eval_count": result.n_prompt_tokens,
            "prompt_eval_duration": int(result.prompt_seconds * 1e9), "eval_count": len(result.tokens),
            "eval_duration": int(result.decode_seconds * 1e9)}


def line(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def ndjson(pool: SlotPool, plan: Plan, lease: Lease, model: str, kind: str, started: int,
                 echo: list[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async with contextlib.aclosing(pool.stream(plan, lease)) as events:
            async for event in events:
                if isinstance(event, Outcome):
                    yield line({**piece_body(model, kind, ""), **final_fields(event, started), "steering": echo})
                else:
                    yield b"".join(line(piece_body(model, kind, piece)) for piece in event)
    except Exception as err:  # noqa: BLE001 - the status is sent: the client gets the error as a line
        client = generation_error(err)
        yield line({"error": (client.body() if client else internal_error(err))["error"]["message"]})
