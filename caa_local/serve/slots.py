"""Slots: N llama.cpp contexts on one loaded model, a fair FIFO queue, cancel on disconnect.

The event loop owns HTTP and the queue; each slot runs the GIL-free native generate on its own
worker thread and sees native types only (a ``Plan``: tokens in). A request first takes its
place (``SlotPool.reserve``: a free slot, or a place in the queue, or QueueFullError), before
any response starts, so "queue full" is a status, never a frame inside a 200 stream. It then
runs inside one async generator (``SlotPool.stream``): its ``finally`` gives up the place, or
sets the slot's cancel flag (polled by the engine between tokens) and hands the slot back once
the native call returns. A place whose stream never started is given back by ``abandon``.
A freed slot goes to the oldest waiter (FIFO); a free slot is chosen by the longest cached
prompt prefix, else least recently used.

Pieces cross from the slot's thread to the loop in batches: the thread wakes the loop only
when no wake-up is pending, and the loop takes every piece that has arrived since, at most once
per PACE seconds. Each wake-up of the loop (and of the client reading the stream) takes a core
from llama.cpp's threads, which wait for each other at every step of a token; a batch of two or
three pieces costs one wake-up instead of one each, and 50 batches a second still read as a
smooth stream.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

from caa_local.core.templates import shared_prefix
from caa_local.engine.engine import Engine, GenerationResult
from caa_local.engine.threads import ThreadPerCall
from caa_local.serve.planning import Plan
from caa_local.serve.sse import StopFilter

PACE = 0.02  # seconds between two batches of pieces sent to one stream


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
    thread_per_call: bool = False  # ThreadPerCall (engine/threads.py) instead of one lasting thread
    executor: Executor = field(init=False)

    def __post_init__(self) -> None:
        name = f"caa-slot-{self.index}"
        self.executor = ThreadPerCall(name) if self.thread_per_call else ThreadPoolExecutor(1, thread_name_prefix=name)


@dataclass(eq=False)
class Lease:
    """A request's place, taken before its response starts: a slot now, or a place in the queue."""

    slot: Optional[Slot] = None
    waiter: Optional[asyncio.Future[Slot]] = None
    used: bool = False  # a stream took it over (and gives it back itself)


def run_plan(engine: Engine, plan: Plan, on_piece: Callable[[str], bool], should_stop: Callable[[], bool]
             ) -> GenerationResult:
    """Generate on one slot's engine with the plan's steering (runs on the slot's thread)."""
    engine.set_steering(plan.terms)
    return engine.generate_tokens(plan.tokens, plan.steer_from, plan.sampling, on_piece, should_stop, plan.check)


class SlotPool:
    def __init__(self, engines: Sequence[Engine], max_queue: int = 256,
                 runner: Callable[..., GenerationResult] = run_plan, thread_per_call: bool = False) -> None:
        self.slots = [Slot(i, engine, thread_per_call=thread_per_call) for i, engine in enumerate(engines)]
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

    def reserve(self, plan: Plan) -> Lease:
        """A free slot (none waiting before us), else a place in the queue, else QueueFullError."""
        if self._free and not self.waiting:
            return Lease(slot=self._pick(plan.tokens))
        if self.waiting >= self.max_queue:
            raise QueueFullError(f"{self.waiting} requests are already waiting for a slot"
                                 if self.max_queue else "every slot is busy and --max-queue is 0")
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return Lease(waiter=waiter)

    async def _slot_of(self, lease: Lease) -> Slot:
        if lease.slot is not None:
            return lease.slot
        assert lease.waiter is not None
        try:
            lease.slot = await lease.waiter
            return lease.slot
        finally:
            if lease.slot is None:  # cancelled while waiting
                self._drop_waiter(lease.waiter)
            self._forget(lease.waiter)

    def _drop_waiter(self, waiter: asyncio.Future[Slot]) -> None:
        if waiter.done() and not waiter.cancelled():
            self.release(waiter.result())  # handed a slot in the same tick it gave up
        else:
            waiter.cancel()

    def _forget(self, waiter: asyncio.Future[Slot]) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def abandon(self, lease: Lease) -> None:
        """Give back a place no stream took over (the response ended before its body ran)."""
        if lease.used:
            return
        lease.used = True
        if lease.slot is not None:
            self.release(lease.slot)
        elif lease.waiter is not None:
            self._drop_waiter(lease.waiter)
            self._forget(lease.waiter)

    def release(self, slot: Slot) -> None:
        slot.last_used = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    # -- one request ------------------------------------------------------------------------
    async def stream(self, plan: Plan, lease: Lease | None = None) -> AsyncIterator[list[str] | Outcome]:
        """Yield the text pieces decoded since the last batch, then one Outcome; cancel-safe at every await."""
        loop = asyncio.get_running_loop()
        lease = lease or self.reserve(plan)
        if lease.used:
            raise RuntimeError("a lease streams once")
        lease.used = True
        slot = await self._slot_of(lease)
        slot.cancel.clear()
        arrived: collections.deque[str] = collections.deque()
        lock = threading.Lock()
        woken = asyncio.Event()
        wake_pending = False
        stop_filter = StopFilter(plan.stops)
        sent: list[str] = []

        def on_piece(piece: str) -> bool:  # the slot's thread
            nonlocal wake_pending
            text = stop_filter.feed(piece)
            if text:
                sent.append(text)
                with lock:
                    arrived.append(text)
                    wake = not wake_pending
                    wake_pending = True
                if wake:
                    loop.call_soon_threadsafe(woken.set)
            return not (stop_filter.stopped or slot.cancel.is_set())

        def take() -> list[str]:
            with lock:
                batch = list(arrived)
                arrived.clear()
            return batch

        def must_wait() -> bool:
            """True when nothing has arrived: the thread may wake the loop again (until then,
            while this stream sends or paces, its pieces gather without waking anyone)."""
            nonlocal wake_pending
            with lock:
                if arrived:
                    return False
                wake_pending = False
                return True

        future = loop.run_in_executor(slot.executor, self.runner, slot.engine, plan, on_piece, slot.cancel.is_set)
        left = False  # the consumer went away before the generation ended

        def finished(done: asyncio.Future[GenerationResult]) -> None:
            # The slot goes back as soon as the native call returns, however slowly the client reads.
            ok = not done.cancelled() and done.exception() is None
            slot.cached = [*plan.tokens, *done.result().tokens] if ok and not left else []
            if left and ok:
                self.cancelled_tokens += len(done.result().tokens)
            self.release(slot)
            woken.set()  # after every piece (the thread queued them first)

        future.add_done_callback(finished)
        try:
            while not future.done():
                if must_wait():
                    await woken.wait()
                    woken.clear()
                batch = take()
                if batch:
                    yield batch
                    await asyncio.sleep(PACE)  # pieces gather meanwhile; the end still wakes us
            batch = take()
            result = future.result()
            tail = stop_filter.flush()
            if tail:
                sent.append(tail)
                batch.append(tail)
            if batch:
                yield batch
            self.served += 1
            yield Outcome(result, "".join(sent), stop_filter.stopped)
        finally:
            if not future.done():
                left = True
                slot.cancel.set()
                self.cancelled += 1

    def close(self) -> None:
        for slot in self.slots:
            slot.cancel.set()
            slot.executor.shutdown(wait=True)
