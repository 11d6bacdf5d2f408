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

from caa_local.engine.engine import GenerationResult, Sampling  # noqa: E402
from caa_local.serve.config import ServeConfig  # noqa: E402
from caa_local.serve.errors import ApiError, error_body, validation_message  # noqa: E402
from caa_local.serve.protocol import ChatCompletionRequest  # noqa: E402
from caa_local.serve.slots import Outcome, Plan, SlotPool  # noqa: E402
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
    with pytest.raises(Exception) as info:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                              "steering": [{"vector": "s", "scale": float("nan")}]})
    message, param = validation_message(info.value.errors())  # type: ignore[attr-defined]
    assert param == "steering[0].scale"
    assert message.startswith("steering[0].scale: ")


def test_steering_items_forbid_unknown_keys_but_requests_allow_them() -> None:
    ok = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "foo": 1})
    assert ok.model_extra == {"foo": 1}
    with pytest.raises(Exception):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                              "steering": [{"vector": "s", "scale": 1, "scael": 2}]})


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
        tag = plan.messages[0]["content"]
        self.order.append(tag)
        gate = self.gates.setdefault(tag, threading.Event())
        on_piece(tag)
        while not gate.wait(0.01):
            if should_stop():
                return GenerationResult(tag, [1], "cancelled", 1, 0, 0.0, 0.0)
        return GenerationResult(tag, [1, 2], "eog", 1, 0, 0.0, 0.0)


def plan_of(tag: str) -> Plan:
    return Plan([{"role": "user", "content": tag}], Sampling(), [], "response", [1, 2, 3])


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
        assert await stream.__anext__() == "x"
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
