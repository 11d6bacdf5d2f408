"""Bench rows of the batch (caa_local.engine.batch): many steered sequences per llama_decode.

- ``batch_vs_llama_cpp_batched``: 8 sequences, each steered differently, through ``Batch.run``
  vs stock llama.cpp decoding 8 unsteered sequences per ``llama_decode`` through its C API
  (llama-cpp-python's ctypes bindings): same GGUF, per-sequence KV streams, threads, greedy
  samplers; aggregate decode tokens/s, prompts prefilled untimed on both sides.
- ``llama_cpp_batched_vs_single``: the same stock llama.cpp decoding 8 sequences per
  ``llama_decode`` vs one: what batching can gain on this machine at all, the ceiling the
  serve and calibration rows are to be read against.
- ``batch_steering_overhead``: one sequence steered through the per-row mechanism (directions
  added at the blocks' outputs in the graph callback) vs through llama.cpp's control vector.
- ``calibrate_vs_before``: a whole calibration, the batched search vs the exhaustive walk.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from caa_local.bench.measure import STORY, Config, interleaved
from caa_local.bench.stock import attach_cli_threadpool

TOPICS = ("a lighthouse keeper", "a travelling circus", "a lost robot", "two rival bakers", "a mountain village",
          "a ship's cat", "an old clockmaker", "a desert caravan")


def story_prompts(n: int) -> list[str]:
    """``n`` long-story requests on different topics (long answers: decoding, not EOG, dominates)."""
    return [STORY.replace("a lighthouse keeper", TOPICS[i % len(TOPICS)]) for i in range(n)]


class LlamaCppBatched:
    """Stock llama.cpp through its C API: one context with ``n_seq`` sequences (one KV stream each,
    as the Batch has), a persistent threadpool as llama.cpp's CLI attaches, one greedy sampler per
    sequence, every live sequence's next token in one llama_decode. Timed: llama_decode and
    sampling calls only (the Python loop filling the batch is not counted)."""

    def __init__(self, model_path: str, n_seq: int, n_ctx_seq: int, threads: int, n_batch: int = 512) -> None:
        import llama_cpp as lc

        self.lc, self.n_seq, self.n_batch = lc, n_seq, n_batch
        self.model = lc.llama_model_load_from_file(model_path.encode(), lc.llama_model_default_params())
        params = lc.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.model or not self.ctx:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.threadpool = attach_cli_threadpool(lc, self.ctx, threads)
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def _put(self, k: int, token: int, pos: int, seq: int, output: bool) -> None:
        b = self.batch
        b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, output
        b.seq_id[k][0] = seq

    def _decode(self, n_tokens: int) -> None:
        self.batch.n_tokens = n_tokens
        if self.lc.llama_decode(self.ctx, self.batch) != 0:
            raise RuntimeError("llama_decode failed")

    def decode_rate(self, prompts: Sequence[list[int]], max_tokens: int) -> float:
        lc = self.lc
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        samplers = []
        for _ in prompts:
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
            samplers.append(chain)
        try:
            nxt, pos = {}, {}
            for s, prompt in enumerate(prompts):  # one sequence per prefill call, untimed
                for start in range(0, len(prompt), self.n_batch):
                    chunk = prompt[start:start + self.n_batch]
                    for k, token in enumerate(chunk):
                        self._put(k, token, start + k, s, start + k == len(prompt) - 1)
                    self._decode(len(chunk))
                nxt[s] = lc.llama_sampler_sample(samplers[s], self.ctx, len(chunk) - 1)
                pos[s] = len(prompt)
            produced = {s: 1 for s in nxt}
            live = [s for s in nxt if not lc.llama_vocab_is_eog(self.vocab, nxt[s])]
            timed = 0.0
            while live:
                for k, s in enumerate(live):
                    self._put(k, nxt[s], pos[s], s, True)
                start = time.perf_counter()
                self._decode(len(live))
                for k, s in enumerate(live):
                    nxt[s] = lc.llama_sampler_sample(samplers[s], self.ctx, k)
                timed += time.perf_counter() - start
                for s in live:
                    pos[s] += 1
                    produced[s] += 1
                live = [s for s in live if produced[s] < max_tokens and not lc.llama_vocab_is_eog(self.vocab, nxt[s])]
            # Tokens decoded per second (each produced token but the first came from a decode step).
            return sum(n - 1 for n in produced.values()) / timed
        finally:
            for chain in samplers:
                lc.llama_sampler_free(chain)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        if self.threadpool:
            self.threadpool()
        self.lc.llama_model_free(self.model)


def batch_decode_rate(batch: Any, items: Sequence[Any]) -> float:
    """Aggregate decode tokens/s of ``batch.run(items)``: every token but each sequence's first
    (sampled after its prefill) over the run's wall time minus the prefills."""
    start = time.perf_counter()
    results = batch.run(items)
    wall = time.perf_counter() - start
    prefill = sum(r.prompt_seconds for r in results)
    return sum(max(len(r.tokens) - 1, 0) for r in results) / (wall - prefill)


def batch_group(cfg: Config) -> dict[str, Any]:
    from caa_local.bench.chat import random_vector
    from caa_local.engine.batch import Batch, Conversation
    from caa_local.engine.engine import Sampling
    from caa_local.engine.model import Model

    model = Model(cfg.model)
    engine = model.context(n_ctx=256, n_threads=cfg.threads)  # renders prompts; its context stays idle
    threads = engine.n_threads
    n_seq = cfg.batch_sequences
    greedy = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=cfg.decode_tokens)
    prompts = [engine.prompt([{"role": "user", "content": text}]) for text in story_prompts(n_seq)]
    n_ctx_seq = max(len(tokens) for tokens, _ in prompts) + cfg.decode_tokens + 8
    # Eight different steerings: a random norm-2 direction per sequence, at layers spread over depth.
    steerable = list(range(1, engine.n_layer))
    terms = []
    for i in range(n_seq):
        layer = steerable[(i * len(steerable)) // n_seq + len(steerable) // (2 * n_seq)]
        vector = random_vector(engine, (layer,), norm=2.0, seed=i)
        terms.append([engine.make_term(f"v{i}", vector, 1.0, (layer,))])
    items = [Conversation(tokens, steer_from, terms[i], greedy) for i, (tokens, steer_from) in enumerate(prompts)]

    figures: dict[str, dict[str, list[float]]] = {}
    batch = Batch(model, n_seq=n_seq, n_ctx=n_ctx_seq, n_threads=threads)
    stock = LlamaCppBatched(str(model.path), n_seq, batch.n_ctx, threads)
    ours, base = interleaved(cfg.repeats, lambda: batch_decode_rate(batch, items),
                             lambda: stock.decode_rate([list(t) for t, _ in prompts], cfg.decode_tokens))
    figures["batch_vs_llama_cpp_batched"] = {"value": ours, "baseline": base}
    # The ceiling of batching on this machine: stock llama.cpp's own n_seq sequences vs one.
    together, alone = interleaved(cfg.repeats, lambda: stock.decode_rate([list(t) for t, _ in prompts],
                                                                         cfg.decode_tokens),
                                  lambda: stock.decode_rate([list(prompts[0][0])], cfg.decode_tokens))
    figures["llama_cpp_batched_vs_single"] = {"value": together, "baseline": alone}
    stock.close()
    counters = batch.counters()
    del batch

    single = Batch(model, n_seq=1, n_ctx=n_ctx_seq, n_threads=threads)
    one = [items[n_seq // 2]]

    def rows() -> float:
        single.force_rows = True
        return batch_decode_rate(single, one)

    def cvec() -> float:
        single.force_rows = False
        return batch_decode_rate(single, one)

    by_rows, by_cvec = interleaved(cfg.repeats, rows, cvec)
    figures["batch_steering_overhead"] = {"value": by_rows, "baseline": by_cvec}
    return {"figures": figures,
            "facts": {"threads": threads, "batch_sequences": n_seq, "batch_tokens": cfg.decode_tokens,
                      "batch_row_decodes": counters["decodes_rows"]}}



def calibrate_group(cfg: Config) -> dict[str, Any]:
    """calibrate_vs_before: the whole calibration of a shipped vector (layer, strength, card),
    today's search with batched conversations vs the exhaustive walk one conversation at a time;
    --quick sizes under --quick. One run each (a calibration takes minutes), walk first."""
    from caa_local.core.locate import load_vector
    from caa_local.engine.engine import Engine
    from caa_local.eval.calibrate import QUICK, Settings, calibrate, load_data

    engine = Engine(cfg.model, n_ctx=2048, n_threads=cfg.threads)
    _, vector = load_vector(CALIBRATED)
    sizes = QUICK if cfg.repeats <= 2 else {}
    figures: dict[str, dict[str, list[float]]] = {"calibrate_vs_before": {"value": [], "baseline": []}}
    picks: dict[str, tuple[Any, Any]] = {}
    strength: dict[str, float] = {}  # seconds of the strength phase (what the strategies change)
    for strategy, key in (("walk", "baseline"), ("search", "value")):
        settings = Settings(metric=CALIBRATED, strategy=strategy, **sizes)  # type: ignore[arg-type]
        data = load_data(CALIBRATED, None, settings)
        marks: dict[str, float] = {}

        def log(message: str) -> None:
            phase = "strength" if "; strength:" in message else "card" if message.startswith("card:") else ""
            marks.setdefault(phase, time.perf_counter())

        start = time.perf_counter()
        summary = calibrate(engine, vector, data, settings, log)
        figures["calibrate_vs_before"][key].append(1.0 / (time.perf_counter() - start))  # calibrations/s
        picks[strategy] = (summary["layer"], summary["recommended_multiplier"])
        strength[strategy] = marks.get("card", time.perf_counter()) - marks["strength"]
    return {"figures": figures,
            "facts": {"threads": engine.n_threads, "calibrate_vector": CALIBRATED,
                      "calibrate_walk": f"layer {picks['walk'][0]} x{picks['walk'][1]:+g}",
                      "calibrate_search": f"layer {picks['search'][0]} x{picks['search'][1]:+g}",
                      "calibrate_strength": f"{strength['walk']:.0f} s vs {strength['search']:.0f} s "
                                            f"({strength['walk'] / strength['search']:.2f}x)"}}


CALIBRATED = "sentiment"  # a shipped vector with a judge-free metric: layer probe + strength + card


def main(argv: list[str]) -> None:
    """``python -m caa_local.bench.batch [--quick] [--calibrate]``: the batch rows (or
    calibrate_vs_before) as JSON."""
    cfg = Config(threads=0)
    if "--quick" in argv:
        cfg = cfg.quick()
    group = calibrate_group if "--calibrate" in argv else batch_group
    print(json.dumps(group(cfg), indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
