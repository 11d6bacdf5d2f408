"""Work on a thread that ends with it, for one-off or side work beside a lasting decode thread.

llama.cpp's CPU backend in the llama-cpp-python wheel is built with OpenMP (libgomp): every
thread that computes a graph keeps a team of OpenMP threads, and once a process holds more of
them than there are cores, libgomp stops spinning at its barriers and every decode of the
process slows (measured: a server's batch decoded a lone request at 153-161 tok/s instead of
188-192 after the steerability probe had run once on the thread that answers requests). A
thread that ends takes its team with it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any


class ThreadPerCall(Executor):
    """Runs each call on a thread of its own that ends with it."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()

        def run() -> None:
            try:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args, **kwargs))
                    except BaseException as err:  # noqa: BLE001 - handed to whoever awaits the future
                        future.set_exception(err)
            finally:
                with self._lock:
                    self._threads.discard(threading.current_thread())

        thread = threading.Thread(target=run, name=self._name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if wait:
            with self._lock:
                running = list(self._threads)
            for thread in running:
                thread.join()
