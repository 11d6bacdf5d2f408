"""The server's benchmark rows, measured against real `caa-local serve` processes.

``serve_group(cfg)`` returns ``{"figures": {name: {"value": [...], "baseline": [...]}}, "facts": {}}``
as caa_local.bench.tasks groups do; ``python -m caa_local.bench.serve [--quick]`` prints it.

- serve_decode_vs_engine: streamed tokens/s through HTTP vs Engine.generate in this process, same
  model, threads and greedy settings; both timed from the first piece to the last (prefill excluded).
- serve_concurrent_vs_serial: total tokens/s of 4 requests with 4 different steerings sent at once
  to a 2-slot server vs the same 4 one after another to a 1-slot server (each with its default
  threads: all cores for 1 slot, half each for 2).
- serve_first_token_ms: request sent -> first streamed token, for a ~50-token user prompt.
- serve_batch_mixed_vs_serial: total tokens/s of 8 greedy requests with 8 different steerings (one
  of them none) sent at once to a `--parallel 8` server (one batch: continuous batching) vs the
  same 8 one after another to the same server.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from typing import Any

from caa_local.bench.measure import STORY, Config, interleaved
from caa_local.engine.engine import Engine, Sampling
from caa_local.serve.testing import ServerProcess

STEERINGS = [[{"vector": "sentiment", "scale": 2}], [{"vector": "sentiment", "scale": -2}],
             [{"vector": "formality", "scale": 2}], [{"vector": "enthusiasm", "scale": 2}]]
# Eight different steerings, one of them none: serve_batch_mixed_vs_serial.
MIXED = [*STEERINGS, [], [{"vector": "sentiment", "scale": 1}], [{"vector": "formality", "scale": -2}],
         [{"vector": "sentiment", "scale": -1}, {"vector": "formality", "scale": 1}]]
FIFTY = ("I am planning a short trip to the mountains next month with two friends who have never hiked "
         "before, and I would like some advice on what we should pack, how far we should walk each day, "
         "and what to do if the weather turns bad.")


def stream_times(port: int, body: dict[str, Any]) -> tuple[float, list[float], int]:
    """(time sent, arrival time of each content piece, completion tokens) of one streamed request."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
    response = conn.getresponse()
    arrivals: list[float] = []
    tokens = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            arrivals.append(time.perf_counter())
    conn.close()
    return sent, arrivals, tokens


def piece_rate(arrivals: list[float]) -> float:
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0


def greedy(messages: list[dict[str, str]], max_tokens: int, steering: list[dict[str, Any]]) -> dict[str, Any]:
    return {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "steering": steering}


def greedy_requests(messages: list[dict[str, str]], max_tokens: int,
                    steerings: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [greedy(messages, max_tokens, steering) for steering in steerings]


def requests_rate(port: int, bodies: list[dict[str, Any]], concurrent: bool) -> float:
    """Streamed tokens/s over ``bodies``, sent all at once (a thread each) or one after another."""
    totals = [0] * len(bodies)

    def one_request(i: int) -> None:
        totals[i] = stream_times(port, bodies[i])[2]

    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=one_request, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(bodies)):
            one_request(i)
    return sum(totals) / (time.perf_counter() - start)


def _note(figures: dict[str, Any], name: str) -> None:
    print(json.dumps({name: figures[name]}), file=sys.stderr, flush=True)  # progress: a slow machine may stop us


def serve_group(cfg: Config) -> dict[str, Any]:
    model = ("--model", cfg.model) if cfg.model else ()
    ctx = ("--ctx", str(cfg.n_ctx))
    story = [{"role": "user", "content": STORY}]
    figures: dict[str, Any] = {}
    with ServerProcess("--slots", "1", "--threads", str(cfg.threads), *ctx, *model) as one:
        engine = Engine(cfg.model, n_ctx=cfg.n_ctx, n_threads=cfg.threads)

        def http_decode() -> float:
            return piece_rate(stream_times(one.port, greedy(story, cfg.decode_tokens, []))[1])

        def engine_decode() -> float:
            arrivals: list[float] = []
            engine.generate(story, Sampling(temperature=0.0, max_tokens=cfg.decode_tokens),
                            on_piece=lambda _: arrivals.append(time.perf_counter()))
            return piece_rate(arrivals)

        served, direct = interleaved(cfg.repeats, http_decode, engine_decode)
        figures["serve_decode_vs_engine"] = {"value": served, "baseline": direct}
        _note(figures, "serve_decode_vs_engine")
        del engine

        def first_token(i: int) -> float:
            prompt = [{"role": "user", "content": f"Question {i}. {FIFTY}"}]
            sent, arrivals, _ = stream_times(one.port, greedy(prompt, 4, []))
            return (arrivals[0] - sent) * 1000
        first_token(-1)
        figures["serve_first_token_ms"] = {"value": [first_token(i) for i in range(cfg.repeats)]}
        _note(figures, "serve_first_token_ms")

        with ServerProcess("--slots", "2", *ctx, *model) as two:
            bodies = greedy_requests(story, cfg.decode_tokens, STEERINGS)
            concurrent, serial = interleaved(max(1, cfg.repeats // 2), lambda: requests_rate(two.port, bodies, True),
                                             lambda: requests_rate(one.port, bodies, False))
            figures["serve_concurrent_vs_serial"] = {"value": concurrent, "baseline": serial}
            _note(figures, "serve_concurrent_vs_serial")
    with ServerProcess("--parallel", str(len(MIXED)), "--threads", str(cfg.threads), *ctx, *model) as batched:
        bodies = greedy_requests(story, cfg.decode_tokens, MIXED)
        together, one_by_one = interleaved(max(1, cfg.repeats // 2), lambda: requests_rate(batched.port, bodies, True),
                                           lambda: requests_rate(batched.port, bodies, False))
        figures["serve_batch_mixed_vs_serial"] = {"value": together, "baseline": one_by_one}
        _note(figures, "serve_batch_mixed_vs_serial")
    return {"figures": figures, "facts": {}}


def main(argv: list[str]) -> None:
    cfg = Config(threads=0)
    if "--quick" in argv:
        cfg = cfg.quick()
    print(json.dumps(serve_group(cfg), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
