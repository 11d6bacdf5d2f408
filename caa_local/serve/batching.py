"""Continuous batching for the server: requests join one running batch instead of a slot each.

``caa-local serve --parallel N`` answers up to N requests as N sequences of one llama.cpp
context (``caa_local.engine.batch.Batch``, a steering per sequence), every live sequence's next
token in one ``llama_decode``; more wait in the batch's first-come queue and join as sequences
free up, each on the free sequence that has cached the longest prefix of its prompt. One driver
thread steps the batch and hands each request's pieces to its async generator; a client that
leaves cancels its request at the next step. ``BatchPool`` offers what the app uses of a
``SlotPool``: ``stream(plan)``, ``slots``, ``idle``, ``waiting``, the counters and ``close``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from caa_local.engine.batch import Conversation, Event
from caa_local.engine.engine import Engine
from caa_local.serve.slots import Outcome, Plan, QueueFullError


@dataclass(frozen=True)
class Lane:
    """One sequence of the batch; ``engine`` is the context whose limits (n_ctx) it shares."""

    index: int
    engine: Engine


class BatchPool:
    def __init__(self, engine: Engine, parallel: int, max_queue: int = 256) -> None:
        self.engine = engine
        self.batch = engine.model.batch(n_seq=parallel, n_ctx=engine.n_ctx, n_threads=engine.n_threads)
        self.slots = [Lane(i, engine) for i in range(parallel)]
        self.max_queue = max_queue
        self.served = 0
        self.cancelled = 0  # generations stopped because their client left
        self.cancelled_tokens = 0  # tokens those generated before they stopped
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event | Exception]] | None] = {}
        self._lock = threading.Lock()  # a request's listener is in place before its first event
        self._wake = threading.Event()
        self._closed = False
        self._driver = threading.Thread(target=self._drive, name="caa-batch", daemon=True)
        self._driver.start()

    @property
    def idle(self) -> int:
        return max(0, len(self.slots) - self.batch.live - self.batch.waiting)

    @property
    def waiting(self) -> int:
        return self.batch.waiting

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
    def _conversation(self, plan: Plan) -> Conversation:
        steer_from = getattr(plan, "steer_from", None)
        if steer_from is None:  # a plan that does not carry it: render the prompt again
            steer_from = self.engine.prompt(plan.messages, positions=plan.positions)[1]
        return Conversation(plan.prompt_tokens, steer_from, tuple(plan.terms), plan.sampling, plan.stops)

    async def stream(self, plan: Plan) -> AsyncIterator[str | Outcome]:
        """Yield text pieces as they are decoded, then one Outcome; cancel-safe at every await."""
        if self.waiting >= self.max_queue:
            raise QueueFullError(f"{self.waiting} requests are already waiting for a sequence")
        queue: asyncio.Queue[Event | Exception] = asyncio.Queue()
        item = self._conversation(plan)
        with self._lock:
            id_ = self.batch.submit(item)
            self._listeners[id_] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        sent: list[str] = []
        done = False
        try:
            while True:
                event = await queue.get()
                if isinstance(event, Exception):  # the step failed: every request then in it ends
                    done = True
                    raise event
                if event.piece:
                    sent.append(event.piece)
                    yield event.piece
                if event.result is not None:
                    done = True
                    self.served += 1
                    yield Outcome(event.result, "".join(sent), event.result.stop_reason == "stop")
                    return
        finally:
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

    def __repr__(self) -> str:
        return f"BatchPool(parallel={len(self.slots)}, live={self.batch.live}, waiting={self.waiting})"

