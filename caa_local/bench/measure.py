"""What every benchmark group measures with: its configuration, interleaved runs, timed rates
and this process's peak memory (a leaf: the groups in tasks.py and serve.py both use it)."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The prompt of every decode measurement: it asks for a long answer.
STORY = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."


@dataclass(frozen=True)
class Config:
    model: str | None = None
    threads: int = 0  # 0: every core
    repeats: int = 5
    n_ctx: int = 4096
    decode_tokens: int = 128
    torch_decode_tokens: int = 32
    prefill_tokens: int = 400
    ab_questions: int = 2
    ab_multipliers: tuple[float, ...] = (-2.0, -1.0, 1.0, 2.0)
    extract_pairs: int = 16
    change_repeats: int = 20
    startup_runs: int = 5
    rpc: str | None = None  # host:port of an RPC worker, for the rpc group
    batch_sequences: int = 8

    def quick(self) -> Config:
        return dataclasses.replace(self, repeats=min(self.repeats, 2), decode_tokens=32, torch_decode_tokens=8,
                                   prefill_tokens=128, ab_questions=1, ab_multipliers=(-1.0, 1.0),
                                   extract_pairs=4, change_repeats=5, startup_runs=2)


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def interleaved(repeats: int, *sides: Callable[[], float]) -> list[list[float]]:
    """One warm-up each, then ``repeats`` runs of every side, the order reversed every run."""
    for side in sides:
        side()
    runs: list[list[float]] = [[] for _ in sides]
    for r in range(repeats):
        order = range(len(sides)) if r % 2 == 0 else reversed(range(len(sides)))
        for i in order:
            runs[i].append(sides[i]())
    return runs


def timed_rate(amount: float, work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return amount / (time.perf_counter() - start)
