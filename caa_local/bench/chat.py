"""Timings of the chat REPL path, as plain dicts of floats (for `caa-local bench` and reports).

- ``startup_times``: `caa-local chat` started in a pseudo-terminal, seconds until its first prompt.
- ``scale_latency``: cost of a live multiplier change (Engine.steer, the `/scale` command, and
  the extra time of the first decode after the change), in milliseconds.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from caa_local.chat.repl import PROMPT, ChatSession

# The status line, then the prompt as prompt_toolkit draws it (escape sequences between).
PROMPT_RE = r"\[steer: [^\]\n]*\]\r?\n(?:\x1b\[[0-9;?]*[A-Za-z]|[\x08\r])*" + PROMPT.strip()
from caa_local.engine.engine import Engine, Sampling
from caa_local.core.vector import ControlVector


def chat_command() -> list[str]:
    """The installed console script, else ``python -m caa_local.cli``."""
    script = Path(sys.executable).parent / "caa-local"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "caa_local.cli"]


def random_vector(engine: Engine, layers: tuple[int, ...] = (10,), norm: float = 20.0,
                  seed: int = 0) -> ControlVector:
    rng = np.random.default_rng(seed)
    directions = {}
    for layer in layers:
        v = rng.standard_normal(engine.n_embd)
        directions[layer] = (v / np.linalg.norm(v) * norm).astype(np.float32)
    return ControlVector(engine.architecture, directions, {"recommended_layer": str(layers[0])})


def startup_times(runs: int = 3, n_threads: int = 2, model: str | None = None,
                  timeout: float = 60.0) -> list[float]:
    """Seconds from spawning `caa-local chat` in a pseudo-terminal to its first prompt."""
    import pexpect

    command = chat_command()
    args = [*command[1:], "chat", "--threads", str(n_threads), *(["--model", model] if model else [])]
    env = {**os.environ, "PROMPT_TOOLKIT_NO_CPR": "1"}
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        child = pexpect.spawn(command[0], args, env=env, timeout=timeout, encoding="utf-8", dimensions=(40, 160))
        try:
            child.expect(PROMPT_RE)
            times.append(time.perf_counter() - start)
            child.sendcontrol("d")
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
    return times


def scale_latency(engine: Engine | None = None, repeats: int = 20, n_threads: int = 2) -> dict[str, float]:
    """Milliseconds to change a multiplier live (target: 50 ms including the next decode's extra)."""
    engine = engine or Engine(n_threads=n_threads)
    vector = random_vector(engine)
    engine.steer("bench", vector, 1.0)
    session = ChatSession(engine, write=lambda _text: None)
    messages = [{"role": "user", "content": "Tell me about your day."}]
    engine.generate(messages, Sampling(max_tokens=1))
    token = engine.tokenize(" day")[-1]
    steer, command, base, after = [], [], [], []
    for i in range(repeats):
        if len(engine.cached_tokens()) + 3 >= engine.n_ctx:
            engine.generate(messages, Sampling(max_tokens=1))
        start = time.perf_counter()
        engine.extend([token])
        base.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.steer("bench", vector, 1.0 + (i % 7))
        steer.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.extend([token])
        after.append(time.perf_counter() - start)
        start = time.perf_counter()
        session.handle(f"/scale bench {2.0 + (i % 5)}")
        command.append(time.perf_counter() - start)
        engine.extend([token])
    engine.unsteer("bench")
    ms = {k: statistics.median(v) * 1e3 for k, v in
          {"steer_ms": steer, "scale_command_ms": command, "decode_ms": base, "decode_after_change_ms": after}.items()}
    ms["change_cost_ms"] = ms["scale_command_ms"] + max(0.0, ms["decode_after_change_ms"] - ms["decode_ms"])
    return ms
