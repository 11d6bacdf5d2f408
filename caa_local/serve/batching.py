"""Continuous batching for the server: requests join one running batch instead of a slot each.

``caa-local serve --parallel N`` answers up to N requests as N sequences of one llama.cpp
context (``caa_local.engine.batch.Batch``, a steering per sequence), every live sequence's next
token in one ``llama_decode``; more wait in the batch's first-come queue and join as sequences
free up, each on the free sequence that has cached the longest prefix of its prompt. One driver
thread steps the batch and hands each request's pieces to its async generator; a client that
leaves cancels its request at the next step. ``BatchPool`` offers what the app uses of a
``SlotPool``: ``reserve(plan)`` (a place before any status), ``stream(plan, lease)`` (lists of
pieces, then an Outcome), ``abandon``, ``slots``, ``idle``, ``waiting``, the counters, ``close``.

A request whose steering waits on a condition (CAST) is decided from its own unsteered prefix
decode, which the batch does not read: such requests run on the server's own context, one at a
time beside the batch (a SlotPool of one), so they are answered right rather than refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from caa_local.engine.batch import Batch, Conversation, Event
from caa_local.engine.engine import Engine
from caa_local.serve.planning import Plan
from caa_local.serve.slots import Lease, Outcome, QueueFullError, SlotPool


@dataclass(frozen=True)
class Lane:
    """One sequence of the batch; ``engine`` is the context whose limits (n_ctx) it shares."""

    index: int
    engine: Engine


@dataclass(eq=False)
class BatchLease:
    """A request's place in the batch (a sequence or a place in its queue), taken before its status."""

    used: bool = False  # a stream took it over (and gives it back itself)


class BatchPool:
    def __init__(self, engine: Engine, parallel: int, max_queue: int = 256) -> None:
        self.engine = engine
        self.batch = Batch(engine.model, n_seq=parallel, n_ctx=engine.n_ctx, n_threads=engine.n_threads)
        self.slots = [Lane(i, engine) for i in range(parallel)]
        # Conditional requests (see above), each on a thread that ends with it (ThreadPerCall).
        self.side = SlotPool([engine], max_queue=max_queue, thread_per_call=True)
        self.max_queue = max_queue
        self.served = 0
        self.cancelled = 0  # generations stopped because their client left
        self.cancelled_tokens = 0  # tokens those generated before they stopped
        self._placed = 0  # leases taken and not yet given back
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event | Exception]] | None] = {}
        self._lock = threading.Lock()  # a request's listener is in place before its first event
        self._wake = threading.Event()
        self._closed = False
        self._driver = threading.Thread(target=self._drive, name="caa-batch", daemon=True)
        self._driver.start()

    @property
    def idle(self) -> int:
        return max(0, len(self.slots) - self._placed)

    @property
    def waiting(self) -> int:
        return max(0, self._placed - len(self.slots)) + self.side.waiting

    # -- the driver thread ------------------------------------------------------------------
    def _drive(self) -> None:
        while not self._closed:
            if self.batch.live == 0 and self.batch.waiting == 0:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                events = self.batch.step()  # the GIL is released while llama.cpp decodes
            except Exception as err:  # noqa: BLE001 - every waiting request gets it, then the next step
                self._fail_all(err)
                continue
            with self._lock:
                for event in events:
                    listener = self._listeners.get(event.id)
                    if event.result is not None:
                        self._listeners.pop(event.id, None)
                    if listener is None:  # its client left: count what it generated
                        if event.result is not None:
                            self.cancelled_tokens += len(event.result.tokens)
                        continue
                    loop, queue = listener
                    loop.call_soon_threadsafe(queue.put_nowait, event)

    def _fail_all(self, err: Exception) -> None:
        with self._lock:
            listeners, self._listeners = self._listeners, {}
        for id_, listener in listeners.items():
            self.batch.cancel(id_)
            if listener is not None:
                loop, queue = listener
                loop.call_soon_threadsafe(queue.put_nowait, err)

    # -- one request ------------------------------------------------------------------------
    def reserve(self, plan: Plan) -> BatchLease | Lease:
        """A sequence or a place in the queue (none waiting before us), else QueueFullError."""
        if plan.check is not None:
            return self.side.reserve(plan)
        if self._placed >= len(self.slots) + self.max_queue:
            raise QueueFullError(f"{self.waiting} requests are already waiting for a sequence"
                                 if self.max_queue else "every sequence is busy and --max-queue is 0")
        self._placed += 1
        return BatchLease()

    def abandon(self, lease: BatchLease | Lease) -> None:
        """Give back a place no stream took over."""
        if isinstance(lease, Lease):
            self.side.abandon(lease)
        elif not lease.used:
            lease.used = True
            self._placed -= 1

    async def stream(self, plan: Plan, lease: BatchLease | Lease | None = None
                     ) -> AsyncIterator[list[str] | Outcome]:
        """Yield the pieces decoded since the last batch of them, then one Outcome; cancel-safe
        at every await."""
        lease = lease or self.reserve(plan)
        if isinstance(lease, Lease):
            async with contextlib.aclosing(self.side.stream(plan, lease)) as events:
                async for event in events:
                    if isinstance(event, Outcome):
                        self.served += 1
                    yield event
            return
        if lease.used:
            raise RuntimeError("a lease streams once")
        lease.used = True
        queue: asyncio.Queue[Event | Exception] = asyncio.Queue()
        item = Conversation(plan.tokens, plan.steer_from, tuple(plan.terms), plan.sampling, plan.stops)
        done = False
        try:
            with self._lock:
                id_ = self.batch.submit(item)
                self._listeners[id_] = (asyncio.get_running_loop(), queue)
            self._wake.set()
            sent: list[str] = []
            while not done:
                events = [await queue.get()]
                while not queue.empty():  # everything that arrived meanwhile goes out as one batch
                    events.append(queue.get_nowait())
                pieces: list[str] = []
                for event in events:
                    if isinstance(event, Exception):  # the step failed: every request then in it ends
                        done = True
                        raise event
                    if event.piece:
                        pieces.append(event.piece)
                    if event.result is not None:
                        done = True
                        sent.extend(pieces)
                        if pieces:
                            yield pieces
                        self.served += 1
                        yield Outcome(event.result, "".join(sent), event.result.stop_reason == "stop")
                        return
                sent.extend(pieces)
                if pieces:
                    yield pieces
        finally:
            self._placed -= 1
            if not done:
                with self._lock:
                    if id_ in self._listeners:
                        self._listeners[id_] = None  # the driver counts its tokens when it ends
                self.batch.cancel(id_)
                self._wake.set()
                self.cancelled += 1

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._driver.join(timeout=30)
        self.side.close()

    def __repr__(self) -> str:
        return f"BatchPool(parallel={len(self.slots)}, live={self.batch.live}, waiting={self.waiting})"
