"""Slots: N llama.cpp contexts on one loaded model, a fair FIFO queue, cancel on disconnect.

The event loop owns HTTP and the queue; each slot runs the GIL-free native generate on its own
worker thread and sees native types only (a ``Plan``). A request leases a slot inside one async
generator (``SlotPool.stream``): its ``finally`` dequeues it, or sets the slot's cancel flag
(polled by the engine between tokens) and hands the slot back once the native call returns.
A freed slot goes to the oldest waiter (FIFO); a free slot is chosen by the longest cached
prompt prefix, else least recently used.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from caa_local.core.steering import SteeringTerm
from caa_local.core.templates import Message, shared_prefix
from caa_local.engine.engine import Engine, GenerationResult, Sampling
from caa_local.serve.sse import StopFilter


@dataclass(frozen=True)
class Plan:
    """One validated request, in native types: what a slot's worker thread needs."""

    messages: list[Message]
    sampling: Sampling
    terms: list[SteeringTerm]
    positions: str
    prompt_tokens: list[int]
    stops: tuple[str, ...] = ()


@dataclass
class Outcome:
    """The end of one generation: the engine's result and the text actually sent."""

    result: GenerationResult
    text: str
    stopped_by_string: bool


class QueueFullError(Exception):
    """More requests are waiting than the server's --max-queue allows."""


@dataclass
class Slot:
    index: int
    engine: Engine
    cancel: threading.Event = field(default_factory=threading.Event)
    last_used: float = 0.0
    cached: list[int] = field(default_factory=list)  # tokens of the last prompt + answer
    executor: ThreadPoolExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"caa-slot-{self.index}")


def run_plan(engine: Engine, plan: Plan, on_piece: Callable[[str], bool], should_stop: Callable[[], bool]
             ) -> GenerationResult:
    """Generate on one slot's engine with the plan's steering (runs on the slot's thread)."""
    engine.set_steering(plan.terms)
    return engine.generate(plan.messages, plan.sampling, on_piece=on_piece, positions=plan.positions,
                           should_stop=should_stop)


class SlotPool:
    def __init__(self, engines: Sequence[Engine], max_queue: int = 256,
                 runner: Callable[..., GenerationResult] = run_plan) -> None:
        self.slots = [Slot(i, engine) for i, engine in enumerate(engines)]
        self._free: list[Slot] = list(self.slots)
        self._waiters: collections.deque[asyncio.Future[Slot]] = collections.deque()
        self.max_queue = max_queue
        self.runner = runner
        self.served = 0
        self.cancelled = 0  # generations stopped because their client left
        self.cancelled_tokens = 0  # tokens those generated before they stopped

    # -- leasing ----------------------------------------------------------------------------
    @property
    def idle(self) -> int:
        return len(self._free)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def _pick(self, tokens: Sequence[int]) -> Slot:
        best = max(self._free, key=lambda s: (shared_prefix(s.cached, tokens), -s.last_used))
        self._free.remove(best)
        return best

    async def acquire(self, tokens: Sequence[int]) -> Slot:
        if self._free and not self.waiting:
            return self._pick(tokens)
        if self.waiting >= self.max_queue:
            raise QueueFullError(f"{self.waiting} requests are already waiting for a slot")
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())  # handed a slot in the same tick it gave up
            else:
                waiter.cancel()
            raise
        finally:
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def release(self, slot: Slot) -> None:
        slot.last_used = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    # -- one request ------------------------------------------------------------------------
    async def stream(self, plan: Plan) -> AsyncIterator[str | Outcome]:
        """Yield text pieces as they are decoded, then one Outcome; cancel-safe at every await."""
        loop = asyncio.get_running_loop()
        slot = await self.acquire(plan.prompt_tokens)
        slot.cancel.clear()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        stop_filter = StopFilter(plan.stops)
        sent: list[str] = []

        def on_piece(piece: str) -> bool:  # the slot's thread
            text = stop_filter.feed(piece)
            if text:
                sent.append(text)
                loop.call_soon_threadsafe(pieces.put_nowait, text)
            return not (stop_filter.stopped or slot.cancel.is_set())

        future = loop.run_in_executor(slot.executor, self.runner, slot.engine, plan, on_piece, slot.cancel.is_set)
        future.add_done_callback(lambda _: pieces.put_nowait(None))  # after every queued piece
        try:
            while (piece := await pieces.get()) is not None:
                yield piece
            result = future.result()
            tail = stop_filter.flush()
            if tail:
                sent.append(tail)
                yield tail
            slot.cached = [*plan.prompt_tokens, *result.tokens]
            self.served += 1
            yield Outcome(result, "".join(sent), stop_filter.stopped)
        finally:
            if future.done():
                self.release(slot)
            else:
                slot.cancel.set()
                slot.cached = []
                self.cancelled += 1
                future.add_done_callback(lambda f: self._release_cancelled(slot, f))

    def _release_cancelled(self, slot: Slot, future: asyncio.Future[GenerationResult]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.cancelled_tokens += len(future.result().tokens)
        self.release(slot)

    def close(self) -> None:
        for slot in self.slots:
            slot.cancel.set()
            slot.executor.shutdown(wait=True)


def finish_reason(outcome: Outcome) -> str:
    """OpenAI's finish_reason: 'length' when the token budget or the context ran out, else 'stop'."""
    if outcome.stopped_by_string:
        return "stop"
    return "length" if outcome.result.stop_reason in ("max_tokens", "context") else "stop"


def usage(outcome: Outcome) -> dict[str, Any]:
    n_out = len(outcome.result.tokens)
    n_in = outcome.result.n_prompt_tokens
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out,
            "prompt_tokens_details": {"cached_tokens": outcome.result.n_reused_tokens}}
