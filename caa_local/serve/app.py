"""The ASGI app: `create_app(...)` wires the guard, the routes and the error handlers.

The factory takes its engine, slot pool and vector library from outside, so the CLI and the
tests build it the same way. /health and /v1/models never touch a slot or the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from caa_local import __version__
from caa_local.core.errors import CaaError
from caa_local.engine.engine import Engine
from caa_local.serve import sse, web
from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import ApiError, error_body, status_kind, validation_message
from caa_local.serve.guard import Guard
from caa_local.serve.library import VectorLibrary
from caa_local.serve.planning import Defaults, plan_request, steering_echo
from caa_local.serve.protocol import ChatCompletionRequest, chunk_body, completion_body, new_id, now
from caa_local.serve.slots import Outcome, Plan, QueueFullError, SlotPool, finish_reason, usage

log = logging.getLogger("caa_local.serve")


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def create_app(config: ServeConfig, engine: Engine, pool: SlotPool, library: VectorLibrary,
               defaults: Defaults = Defaults()) -> FastAPI:
    app = FastAPI(title="caa-local", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, config=config)
    model_id = config.model_id or engine.model_path.name
    n_ctx = min(slot.engine.n_ctx for slot in pool.slots)

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
        log.exception("internal error")
        return JSONResponse(error_body(f"internal error: {type(err).__name__}: {err}", "server"), status_code=500)

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
            "n_ctx": n_ctx, "slots": len(pool.slots)}]}

    @app.get("/v1/vectors")
    async def vectors() -> dict[str, Any]:
        return {"object": "list", "data": library.describe(),
                "default_steering": steering_echo(defaults.terms), "default_positions": defaults.positions,
                "n_layer": engine.n_layer}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        chat = parse_request(await request.body())
        plan = plan_request(chat, engine, library, config, defaults, n_ctx)
        if pool.waiting >= pool.max_queue:
            raise ApiError(f"server busy: {pool.waiting} requests are waiting for a slot; retry later",
                           "unavailable", None, "queue_full")
        meta = {"cid": new_id(), "created": now(), "model": chat.model or model_id,
                "steering": steering_echo(plan.terms), "positions": plan.positions}
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(stream_frames(pool, plan, meta, include_usage),
                                     media_type="text/event-stream", headers=sse.HEADERS)
        outcome = await run_until_disconnect(pool, plan, request)
        if outcome is None:
            return Response(status_code=499)  # the client is gone; nobody reads this
        return JSONResponse({
            **completion_body(meta["cid"], meta["created"], meta["model"], outcome.text, finish_reason(outcome),
                              usage(outcome), meta["steering"]),
            "steering_positions": plan.positions,
            **({"conditions": outcome.result.conditions} if outcome.result.conditions else {})})

    return app


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(f"request body is not valid JSON: {err}", "invalid_request", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(f"request body must be a JSON object, got {type(data).__name__}", "invalid_request",
                       None, "invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        message, param = validation_message(list(err.errors()))
        raise ApiError(message, "validation", param) from None


async def _collect(pool: SlotPool, plan: Plan) -> Outcome:
    async with contextlib.aclosing(pool.stream(plan)) as events:
        async for event in events:
            if isinstance(event, Outcome):
                return event
    raise RuntimeError("generation ended without a result")


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_until_disconnect(pool: SlotPool, plan: Plan, request: Request) -> Outcome | None:
    """The whole answer, or None when the client left first (its generation is then cancelled)."""
    work = asyncio.ensure_future(_collect(pool, plan))
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
    except QueueFullError as err:
        raise ApiError(f"server busy: {err}; retry later", "unavailable", None, "queue_full") from None
    except CaaError as err:  # the engine refused the request (e.g. the context filled)
        raise ApiError(f"generation failed: {err}", "invalid_request") from None


async def stream_frames(pool: SlotPool, plan: Plan, meta: dict[str, Any], include_usage: bool
                        ) -> AsyncIterator[bytes]:
    cid, created, model = meta["cid"], meta["created"], meta["model"]
    yield sse.frame(chunk_body(cid, created, model, {"role": "assistant", "content": None},
                               steering=meta["steering"], steering_positions=meta["positions"]))
    try:
        async with contextlib.aclosing(pool.stream(plan)) as events:
            async for event in events:
                if isinstance(event, Outcome):
                    checked = {"conditions": event.result.conditions} if event.result.conditions else {}
                    yield sse.frame(chunk_body(cid, created, model, {}, finish_reason(event), **checked))
                    if include_usage:
                        yield sse.frame({"id": cid, "object": "chat.completion.chunk", "created": created,
                                         "model": model, "choices": [], "usage": usage(event)})
                else:
                    yield sse.frame(chunk_body(cid, created, model, {"content": event}))
    except QueueFullError as err:
        yield sse.frame(error_body(f"server busy: {err}; retry later", "unavailable", None, "queue_full"))
    except Exception as err:  # noqa: BLE001 - the client gets the error as a frame, not a cut stream
        log.exception("generation failed")
        yield sse.frame(error_body(f"generation failed: {type(err).__name__}: {err}", "server"))
    yield sse.DONE
