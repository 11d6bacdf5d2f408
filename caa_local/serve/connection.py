"""uvicorn's h11 protocol with a deadline on each request's head (its line and headers).

h11 bounds the head's size (16 KiB) but not its time, and uvicorn's keep-alive timer is reset by
every byte, so a client that sends a header byte now and then would hold its connection, one of
the --max-connections, forever. Here the head must have arrived within the deadline from the
connection's start or from the previous answer's end; the connection is closed otherwise. The
body has its own deadline (body.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def head_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """An H11Protocol class whose connections close when a request's head is late by ``seconds``."""

    class HeadDeadlineH11(H11Protocol):
        head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in: the body deadline takes over
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self.head_timer = self.loop.call_later(seconds, self._late)

        def _disarm(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _late(self) -> None:
            self.head_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeadDeadlineH11
