"""The ASGI app: `create_app(...)` wires the guards, the routes and the error handlers.

The factory takes its engine, slot pool and vector library from outside, so the CLI and the
tests build it the same way. /health and /v1/models never touch a slot or the queue. A chat
request is parsed and planned on a worker thread (JSON, template, tokenizer: never on the
event loop), takes its place (slot or queue) before any status is sent, then runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from caa_local import __version__
from caa_local.core.errors import CaaError
from caa_local.engine.engine import Engine
from caa_local.engine.engine import ContextFullError
from caa_local.serve import sse, web
from caa_local.serve.body import BodyGuard
from caa_local.serve.browser import BrowserGuard
from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import ApiError, error_body, status_kind, validation_message
from caa_local.serve.guard import Guard
from caa_local.serve.library import VectorLibrary
from caa_local.serve.limits import parse_json
from caa_local.serve.planning import Defaults, Plan, plan_request, steering_echo
from caa_local.serve.presets import Preset, PresetBook
from caa_local.serve.presets import mount as mount_presets
from caa_local.serve.protocol import (ChatCompletionRequest, chunk_body, completion_body, finish_reason, new_id,
                                      now, usage)
from caa_local.serve.slots import Lease, Outcome, QueueFullError, SlotPool

log = logging.getLogger("caa_local.serve")
T = TypeVar("T")
PLANNERS = 2  # worker threads that parse and plan requests (the tokenizer runs without the GIL)


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def internal_error(err: BaseException) -> dict[str, Any]:
    """The body for a failure of ours: a request id to find the logged traceback, never its text."""
    rid = uuid.uuid4().hex[:12]
    log.error("internal error, request id %s", rid, exc_info=err)
    return error_body(f"internal error (request id {rid}); the server log has the details", "server", None,
                      "internal_error")


def install_guards(app: FastAPI, config: ServeConfig) -> None:
    """The layers a request passes, outermost (added last) first: browsers (Origin, CORS, content
    type), then Host and key, then the body (size, deadline)."""
    app.add_middleware(BodyGuard, config=config)
    app.add_middleware(Guard, config=config)
    app.add_middleware(BrowserGuard, config=config)


def create_app(config: ServeConfig, engine: Engine, pool: SlotPool, library: VectorLibrary,
               defaults: Defaults = Defaults(), presets: PresetBook | None = None) -> FastAPI:
    app = FastAPI(title="caa-local", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    install_guards(app, config)
    app.state.planner = ThreadPoolExecutor(PLANNERS, thread_name_prefix="caa-plan")
    model_id = config.model_id or engine.model_path.name
    n_ctx = min(slot.engine.n_ctx for slot in pool.slots)
    book = presets or PresetBook.build(engine, library, config, defaults)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = validation_message(list(err.errors()))
        return error_response(ApiError(message, "validation", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = status_kind(err.status_code)
        message = f"{request.method} {request.url.path}: " + (
            "no such endpoint" if err.status_code == 404 else str(err.detail))
        return JSONResponse(error_body(message, kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _crash(_: Request, err: Exception) -> JSONResponse:
        return JSONResponse(internal_error(err), status_code=500)

    def parse_and_plan(body: bytes) -> tuple[ChatCompletionRequest, Preset | None, Plan]:
        chat = parse_request(body)
        preset = book.resolve(chat.model)  # a preset's steering and defaults, chosen by model name
        chat = book.apply(preset, chat)
        return chat, preset, plan_request(chat, engine, library, config, book.defaults(preset), n_ctx)

    # -- public: health and the page ---------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "slots": len(pool.slots), "slots_idle": pool.idle,
                "queued": pool.waiting, "auth": bool(config.api_key),
                "served": pool.served, "cancelled": pool.cancelled, "cancelled_tokens": pool.cancelled_tokens}

    web.mount(app)

    # -- the API -----------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_id, "object": "model", "created": 0, "owned_by": "caa-local",
            "architecture": engine.architecture, "n_layer": engine.n_layer, "n_embd": engine.n_embd,
            "n_ctx": n_ctx, "slots": len(pool.slots), "aliases": list(book.aliases)},
            *({"id": p["id"], "object": "model", "created": 0, "owned_by": "caa-local", "parent": model_id,
               "steering": p["steering"], "description": p["description"]} for p in book.describe())]}

    mount_presets(app, book)

    @app.get("/v1/vectors")
    async def vectors() -> dict[str, Any]:
        return {"object": "list", "data": library.describe(),
                "default_steering": steering_echo(defaults.terms), "default_positions": defaults.positions,
                "n_layer": engine.n_layer}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat, preset, plan = await off_loop(app, parse_and_plan, await request.body())
        lease = reserve(pool, plan)
        meta = {"cid": new_id(), "created": now(), "model": preset.name if preset else (chat.model or model_id),
                "steering": steering_echo(plan.terms), "positions": plan.positions}
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return LeasedStream(pool, lease, stream_frames(pool, plan, lease, meta, include_usage),
                                media_type="text/event-stream", headers=sse.HEADERS)
        try:
            outcome = await run_until_disconnect(pool, plan, lease, request)
        finally:
            pool.abandon(lease)
        if outcome is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        result = outcome.result
        return JSONResponse({
            **completion_body(meta["cid"], meta["created"], meta["model"], outcome.text,
                              finish_reason(result.stop_reason, outcome.stopped_by_string),
                              usage(result.n_prompt_tokens, len(result.tokens), result.n_reused_tokens),
                              meta["steering"]),
            "steering_positions": plan.positions,
            **({"conditions": result.conditions} if result.conditions else {})})

    return app


async def off_loop(app: FastAPI, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` on the app's planner threads: parsing, templates and tokenizing never run on
    the event loop (every API the app serves plans through here)."""
    return await asyncio.get_running_loop().run_in_executor(app.state.planner, work, *args)


def reserve(pool: SlotPool, plan: Plan) -> Lease:
    """The request's place (a slot, or one in the queue), or 503 queue_full as a status."""
    try:
        return pool.reserve(plan)
    except QueueFullError as err:
        raise ApiError(f"server busy: {err}; retry later", "unavailable", None, "queue_full") from None


class LeasedStream(StreamingResponse):
    """A stream holding a place in the pool: the place goes back however the response ends,
    even when the client left before the body started."""

    def __init__(self, pool: SlotPool, lease: Lease, content: AsyncIterator[bytes], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.pool = pool
        self.lease = lease

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.pool.abandon(self.lease)


def parse_request(body: bytes) -> ChatCompletionRequest:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(f"request body must be a JSON object, got {type(data).__name__}", "invalid_request",
                       None, "invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(list(err.errors()))
        raise ApiError(message, "validation", param) from None


async def _collect(pool: SlotPool, plan: Plan, lease: Lease) -> Outcome:
    async with contextlib.aclosing(pool.stream(plan, lease)) as events:
        async for event in events:
            if isinstance(event, Outcome):
                return event
    raise RuntimeError("generation ended without a result")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def generation_error(err: Exception) -> ApiError | None:
    """The client's error for an engine refusal (None: a failure of ours)."""
    if isinstance(err, ContextFullError):
        return ApiError(f"messages: {err}", "context_length", "messages", "context_length_exceeded")
    if isinstance(err, CaaError):
        return ApiError(f"generation failed: {err}", "invalid_request")
    return None


async def run_until_disconnect(pool: SlotPool, plan: Plan, lease: Lease, request: Request) -> Outcome | None:
    """The whole answer, or None when the client left first (its generation is then cancelled)."""
    work = asyncio.ensure_future(_collect(pool, plan, lease))
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        return None
    try:
        return work.result()
    except Exception as err:
        client = generation_error(err)
        if client is None:
            raise
        raise client from None


async def stream_frames(pool: SlotPool, plan: Plan, lease: Lease, meta: dict[str, Any], include_usage: bool
                        ) -> AsyncIterator[bytes]:
    cid, created, model = meta["cid"], meta["created"], meta["model"]
    yield sse.frame(chunk_body(cid, created, model, {"role": "assistant", "content": None},
                               steering=meta["steering"], steering_positions=meta["positions"]))
    pieces = sse.PieceFrames(lambda mark: chunk_body(cid, created, model, {"content": mark}))
    try:
        async with contextlib.aclosing(pool.stream(plan, lease)) as events:
            async for event in events:
                if isinstance(event, Outcome):
                    result = event.result
                    checked = {"conditions": result.conditions} if result.conditions else {}
                    yield sse.frame(chunk_body(cid, created, model, {},
                                               finish_reason(result.stop_reason, event.stopped_by_string), **checked))
                    if include_usage:
                        yield sse.frame({"id": cid, "object": "chat.completion.chunk", "created": created,
                                         "model": model, "choices": [],
                                         "usage": usage(result.n_prompt_tokens, len(result.tokens),
                                                        result.n_reused_tokens)})
                else:
                    yield pieces(event)
    except Exception as err:  # noqa: BLE001 - the status is sent: the client gets the error as a frame
        client = generation_error(err)
        yield sse.frame(client.body() if client else internal_error(err))
    yield sse.DONE
