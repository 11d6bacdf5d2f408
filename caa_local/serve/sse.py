"""Server-sent events frames and stop strings, for streamed answers.

Frames are LF-only ``data: <json>\\n\\n`` and end with ``data: [DONE]`` (clients broke on CRLF
and on a missing [DONE] elsewhere). ``StopFilter`` holds back text that could be the start of a
stop string, so a stop string never reaches the client in pieces.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def frame(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


_MARK = "\x00"  # rendered as "\u0000": never produced by dumping anything but itself


class PieceFrames:
    """Frames for one stream's text pieces, rendered once around a mark and filled per piece:
    a streamed token costs one string dump, not a whole chunk's (the chunk comes from ``body``)."""

    def __init__(self, body: Callable[[str], dict[str, Any]]) -> None:
        whole = frame(body(_MARK))
        mark = json.dumps(_MARK).encode()
        self.head, _, self.tail = whole.rpartition(mark)

    def __call__(self, pieces: Sequence[str]) -> bytes:
        """One frame per piece, joined for a single write."""
        dumps = json.dumps
        return b"".join(self.head + dumps(p, ensure_ascii=False).encode() + self.tail for p in pieces)


class StopFilter:
    """Feed pieces; get back what may be sent now, and whether a stop string was met."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            at = min(hits)[0]
            out, self.pending, self.stopped = self.pending[:at], "", True
            return out
        hold = max((self._overlap(s) for s in self.stops), default=0)
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _overlap(self, stop: str) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of ``stop``."""
        for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if self.pending.endswith(stop[:size]):
                return size
        return 0
