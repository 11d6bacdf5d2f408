"""The server's parts that need no model: stop strings, error bodies, host check, the slot queue.

The queue tests use a stand-in runner, the one case the real model cannot show on demand: a
forced order of arrivals and releases (everything a user sees runs on the real server in
test_serve.py).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")

from pydantic import ValidationError  # noqa: E402

from caa_local.engine.engine import GenerationResult, Sampling  # noqa: E402
from caa_local.serve.config import ServeConfig  # noqa: E402
from caa_local.serve.errors import ApiError, error_body, validation_message  # noqa: E402
from caa_local.serve.protocol import ChatCompletionRequest  # noqa: E402
from caa_local.serve.planning import Plan  # noqa: E402
from caa_local.serve.slots import Outcome, SlotPool  # noqa: E402
from caa_local.serve.sse import StopFilter, frame  # noqa: E402


def test_stop_filter_holds_back_a_possible_prefix() -> None:
    f = StopFilter(["END"])
    assert f.feed("hello E") == "hello "
    assert f.feed("N") == ""
    assert f.feed("D and more") == ""
    assert f.stopped
    assert f.flush() == ""


def test_stop_filter_releases_a_false_alarm_and_flushes() -> None:
    f = StopFilter(["###"])
    assert f.feed("a #") == "a "
    assert f.feed("b") == "#b"
    assert f.feed("#") == ""
    assert f.flush() == "#"
    assert not f.stopped


def test_stop_filter_without_stops_passes_everything() -> None:
    f = StopFilter([])
    assert f.feed("x") == "x" and f.flush() == ""


def test_frame_is_lf_only_data_line() -> None:
    data = frame({"a": "é"})
    assert data.startswith(b"data: ") and data.endswith(b"\n\n") and b"\r" not in data
    assert "é".encode() in data


def test_error_body_shape_and_address_scrub() -> None:
    body = error_body("bad thing at 0x7ffd12345678", "not_found", "steering[0].vector", "unknown_vector")
    assert body == {"error": {"message": "bad thing at 0x...", "type": "not_found_error",
                              "param": "steering[0].vector", "code": "unknown_vector"}}
    assert ApiError("x", "too_large").status == 413
    with pytest.raises(ValueError):
        ApiError("x", "no-such-kind")


def test_validation_message_names_the_parameter() -> None:
    with pytest.raises(ValidationError, match="steering.0.scale") as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                              "steering": [{"vector": "s", "scale": float("nan")}]})
    message, param = validation_message(info.value.errors())  # type: ignore[attr-defined]
    assert param == "steering[0].scale"
    assert message.startswith("steering[0].scale: ")


def test_steering_items_forbid_unknown_keys_but_requests_allow_them() -> None:
    ok = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "foo": 1})
    assert ok.model_extra == {"foo": 1}
    with pytest.raises(ValidationError, match="scael") as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                              "steering": [{"vector": "s", "scale": 1, "scael": 2}]})
    assert {tuple(e["loc"]) for e in info.value.errors()} >= {("steering", 0, "scael")}


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8080", True), ("localhost:8080", True), ("[::1]:8080", True), ("localhost", True),
    ("evil.example:8080", False), ("192.168.1.5:8080", False), ("", False),
])
def test_host_check_without_key(host: str, allowed: bool) -> None:
    assert ServeConfig().allowed_host(host) is allowed
    assert ServeConfig(api_key="k").allowed_host(host) is True


# -- the queue, with a stand-in runner ------------------------------------------------------------
class Gate:
    """A runner that emits one piece, then waits until the test opens its gate (or is cancelled)."""

    def __init__(self) -> None:
        self.gates: dict[str, threading.Event] = {}
        self.order: list[str] = []

    def __call__(self, engine: Any, plan: Plan, on_piece: Any, should_stop: Any) -> GenerationResult:
        tag = "".join(map(chr, plan.tokens))
        self.order.append(tag)
        gate = self.gates.setdefault(tag, threading.Event())
        on_piece(tag)
        while not gate.wait(0.01):
            if should_stop():
                return GenerationResult(tag, [1], "cancelled", 1, 0, 0.0, 0.0)
        return GenerationResult(tag, [1, 2], "eog", 1, 0, 0.0, 0.0)


def plan_of(tag: str) -> Plan:
    return Plan(Sampling(), [], "response", [ord(c) for c in tag], 0)


async def collect(pool: SlotPool, tag: str) -> Outcome:
    async for event in pool.stream(plan_of(tag)):
        if isinstance(event, Outcome):
            return event
    raise AssertionError("no outcome")


def test_queue_is_fifo_and_a_cancelled_waiter_gives_up_its_place() -> None:
    async def main() -> None:
        gate = Gate()
        pool = SlotPool([object()], runner=gate)  # type: ignore[list-item]
        first = asyncio.create_task(collect(pool, "a"))
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(collect(pool, tag)) for tag in ("b", "c", "d")]
        await asyncio.sleep(0.05)
        assert pool.waiting == 3 and pool.idle == 0
        waiting[1].cancel()  # "c" leaves the queue before its turn
        await asyncio.sleep(0.05)
        assert pool.waiting == 2
        for tag in ("a", "b", "d"):
            gate.gates.setdefault(tag, threading.Event()).set()
        outcomes = await asyncio.gather(first, waiting[0], waiting[2])
        assert [o.text for o in outcomes] == ["a", "b", "d"]
        assert gate.order == ["a", "b", "d"]
        assert pool.idle == 1 and pool.waiting == 0
        pool.close()

    asyncio.run(main())


def test_a_consumer_that_leaves_cancels_generation_and_frees_the_slot() -> None:
    async def main() -> None:
        gate = Gate()
        pool = SlotPool([object()], runner=gate)  # type: ignore[list-item]
        stream = pool.stream(plan_of("x"))
        assert await stream.__anext__() == ["x"]
        await stream.aclose()  # as a disconnect does
        for _ in range(200):
            if pool.idle == 1:
                break
            await asyncio.sleep(0.01)
        assert pool.idle == 1 and pool.cancelled == 1 and pool.cancelled_tokens == 1
        gate.gates["y"] = threading.Event()
        gate.gates["y"].set()
        assert (await collect(pool, "y")).text == "y"
        pool.close()

    asyncio.run(main())


def test_the_server_imports_neither_torch_nor_the_cli_nor_evaluation() -> None:
    import subprocess
    import sys

    code = ("import sys, caa_local.serve.app, caa_local.serve.server; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m.startswith(('caa_local.cli', 'caa_local.eval', 'caa_local.chat'))]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_full_queue_refuses_more_waiters() -> None:
    from caa_local.serve.slots import QueueFullError

    async def main() -> None:
        gate = Gate()
        pool = SlotPool([object()], max_queue=1, runner=gate)  # type: ignore[list-item]
        running = asyncio.create_task(collect(pool, "a"))
        await asyncio.sleep(0.05)
        queued = asyncio.create_task(collect(pool, "b"))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError):
            await collect(pool, "c")
        for tag in ("a", "b"):
            gate.gates.setdefault(tag, threading.Event()).set()
        assert [o.text for o in await asyncio.gather(running, queued)] == ["a", "b"]
        pool.close()

    asyncio.run(main())


def test_max_queue_zero_serves_when_a_slot_is_free_and_refuses_when_none_is() -> None:
    from caa_local.serve.slots import QueueFullError

    async def main() -> None:
        gate = Gate()
        pool = SlotPool([object()], max_queue=0, runner=gate)  # type: ignore[list-item]
        running = asyncio.create_task(collect(pool, "a"))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError, match="--max-queue is 0"):
            pool.reserve(plan_of("x"))
        gate.gates["a"].set()
        assert (await running).text == "a"
        gate.gates["b"] = threading.Event()
        gate.gates["b"].set()
        assert (await collect(pool, "b")).text == "b"
        pool.close()

    asyncio.run(main())


def test_a_place_no_stream_took_over_is_given_back() -> None:
    async def main() -> None:
        gate = Gate()
        pool = SlotPool([object()], runner=gate)  # type: ignore[list-item]
        held = pool.reserve(plan_of("x"))
        queued = pool.reserve(plan_of("y"))
        assert pool.idle == 0 and pool.waiting == 1
        pool.abandon(queued)
        assert pool.waiting == 0
        pool.abandon(held)
        pool.abandon(held)  # twice is harmless
        assert pool.idle == 1
        pool.close()

    asyncio.run(main())


# -- bounded parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "code", "param"), [
    (b"[" * 100_000 + b"]" * 100_000, "too_deep", None),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "too_deep", None),
    (b'{"max_tokens": ' + b"9" * 5000 + b"}", "number_too_long", "max_tokens"),
    (b'{"temperature": 0.' + b"1" * 5000 + b"}", "number_too_long", "temperature"),
    (b"[" + b"1" * 60 + b"]", "number_too_long", None),
    (b'{"messages": [{"role": "user", "content": "a\\\\ud800b"}]}', None, None),  # an escaped backslash: fine
    (b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "invalid_text", "messages[0].content"),
    (b'{"x\\udfff": 1}', "invalid_text", None),
    (b'{"stop": [' + b",".join([b'"s"'] * 5000) + b"]}", "too_many_items", "stop"),
    (b"{" + b",".join(b'"k%d": 1' % i for i in range(300)) + b"}", "too_many_keys", None),
    (b"\xff\xfe", "invalid_json", None),
])
def test_parse_json_bounds_depth_digits_sizes_and_text(body: bytes, code: str | None, param: str | None) -> None:
    from caa_local.serve.limits import parse_json

    if code is None:
        parse_json(body)
        return
    with pytest.raises(ApiError) as info:
        parse_json(body)
    assert (info.value.code, info.value.param, info.value.status) == (code, param, 400)
    assert len(info.value.message) < 200


def test_a_layer_range_is_checked_before_it_is_expanded() -> None:
    from caa_local.core.errors import LayerRangeError
    from caa_local.core.layers import parse_layer_spec

    with pytest.raises(LayerRangeError, match="layer 3000000 is out of range"):
        parse_layer_spec("1-3000000", 30)
    with pytest.raises(LayerRangeError, match="bad layer spec"):
        parse_layer_spec("1-" + "9" * 5000, 30)
    with pytest.raises(LayerRangeError, match="beyond any model"):
        parse_layer_spec("1-99999999")
    assert parse_layer_spec("3-5, 9", 30) == [3, 4, 5, 9]


def test_piece_frames_equal_whole_chunks() -> None:
    from caa_local.serve.protocol import chunk_body
    from caa_local.serve.sse import PieceFrames

    model = 'm "\x00" \u2603'
    frames = PieceFrames(lambda mark: chunk_body("id", 7, model, {"content": mark}))
    pieces = ["a", ' "q" ', "\x00", "é☃", "\n"]
    assert frames(pieces) == b"".join(frame(chunk_body("id", 7, model, {"content": p})) for p in pieces)


def test_finish_reason_and_usage() -> None:
    from caa_local.serve.protocol import finish_reason, usage

    assert finish_reason("max_tokens", False) == "length" and finish_reason("context", False) == "length"
    assert finish_reason("eog", False) == "stop" and finish_reason("max_tokens", True) == "stop"
    assert usage(10, 3, 4) == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13,
                               "prompt_tokens_details": {"cached_tokens": 4}}


def test_an_internal_error_answers_a_request_id_and_logs_the_traceback() -> None:
    import logging

    from caa_local.serve.app import internal_error, log

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    was_disabled, log.disabled = log.disabled, False  # another test's dictConfig may have disabled it
    try:
        try:
            raise RuntimeError("secret path /home/me/model.gguf")
        except RuntimeError as err:
            body = internal_error(err)
    finally:
        log.removeHandler(handler)
        log.disabled = was_disabled
    message = body["error"]["message"]
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
    assert "secret" not in message and "RuntimeError" not in message
    rid = message.split("request id ")[1].split(")")[0]
    assert any(rid in r.getMessage() and r.exc_info for r in records)


def test_host_check_stays_on_for_a_public_bind_and_takes_allowed_names() -> None:
    public = ServeConfig(host="0.0.0.0", allow_hosts=("my-box.lan",))
    assert public.allowed_host("my-box.lan:8080") and public.allowed_host("localhost:8080")
    assert not public.allowed_host("rebind.example:8080") and not public.allowed_host("192.168.1.5")
    assert ServeConfig(host="192.168.1.5").allowed_host("192.168.1.5:8080")  # the bind address itself
    assert ServeConfig(allow_hosts=("*",)).allowed_host("anything.example")


@pytest.mark.parametrize(("value", "ok"), [
    (b"application/json", True), (b"application/json; charset=utf-8", True), (b"Application/JSON", True),
    (b"text/plain", False), (b"application/jsonx", False), (b"", False),
])
def test_only_json_bodies_pass(value: bytes, ok: bool) -> None:
    from caa_local.serve.browser import is_json

    assert is_json(value) is ok


def test_a_write_that_waits_past_the_deadline_ends_the_response() -> None:
    """The ASGI send of a client that never reads never returns; the real socket case needs more
    answer than the kernel's buffers hold, so this drives BodyGuard with such a send directly."""
    from caa_local.serve.body import BodyGuard

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def stuck_send(message: Any) -> None:
        await asyncio.Event().wait()

    async def receive() -> Any:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def main() -> None:
        guard = BodyGuard(app, ServeConfig(write_timeout=0.05))
        with pytest.raises(ConnectionAbortedError, match="did not read"):
            await asyncio.wait_for(guard({"type": "http", "method": "GET", "headers": []}, receive, stuck_send), 5)

    asyncio.run(main())
