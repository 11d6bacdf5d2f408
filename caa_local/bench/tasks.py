"""The measurements of `caa-local bench`, each group run in a fresh worker process.

``python -m caa_local.bench.tasks GROUP CONFIG.json OUT.json`` writes ``{"figures": {name:
{"value": [...], "baseline": [...]}}, "peak_rss_mib": ..., "facts": {...}}``. A worker
process per group keeps torch out of the llama.cpp comparisons and gives each peak-RSS
figure a process of its own. Every comparison runs both sides in one process, alternating
(A B, B A, A B, ...) after one untimed warm-up each, so drift on a shared machine hits both;
the figures are rates (higher is better), one per run. The exception is
decode_native_vs_transformers: torch's idle OpenMP threads slow llama.cpp in the same process,
so each of its sides runs in processes of its own, alternated by the runner.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from caa_local.bench.measure import STORY, Config, interleaved, peak_rss_mib, timed_rate
from caa_local.bench.batch import batch_group, calibrate_group
from caa_local.bench.serve import serve_group
from caa_local.bench.stock import LlamaCppDecoder

PREFILL_TEXT = ("The lighthouse stood on a rock at the edge of the bay, and every night its keeper climbed "
                "the one hundred and twelve steps to trim the wick, polish the lens and watch the sea. ")
AB_DATASET = "sentiment"
EXTRACT_BEHAVIORS = ("coordinate-other-ais", "corrigible-neutral-HHH", "hallucination", "myopic-reward",
                     "survival-instinct", "sycophancy", "refusal")


def _engine(cfg: Config):  # noqa: ANN202 - Engine
    from caa_local.engine.engine import Engine

    return Engine(cfg.model, n_ctx=cfg.n_ctx, n_threads=cfg.threads)


def _greedy(max_tokens: int):  # noqa: ANN202 - Sampling
    from caa_local.engine.engine import Sampling

    return Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=max_tokens)


def native_decode(engine: Any, messages: list[dict[str, str]], max_tokens: int) -> float:
    """Decode tokens/s of Engine.generate: prefill untimed, then greedy sampling + decoding
    (stops at end-of-generation like any chat answer: the prompt asks for a long story)."""
    result = engine.generate(messages, _greedy(max_tokens))
    return len(result.tokens) / result.decode_seconds


def _native_group(cfg: Config) -> dict[str, Any]:
    from llama_cpp import Llama

    from caa_local.bench.chat import random_vector, scale_latency
    from caa_local.engine.scoring import choices_from_items, score_ab, score_ab_naive

    engine = _engine(cfg)
    threads = engine.n_threads
    llm = Llama(str(engine.model_path), n_ctx=cfg.n_ctx, n_threads=threads, n_threads_batch=threads,
                flash_attn=engine.model.flash_attn != "off", verbose=False)  # llama.cpp's auto: on for the CPU
    messages = [{"role": "user", "content": STORY}]
    tokens, _ = engine.prompt(messages)

    def llama_decode() -> float:
        """The same loop through llama-cpp-python's Llama.generate (the loop under
        create_completion, minus its per-token text handling): prefill untimed."""
        llm.reset()
        llm.eval(tokens)
        n, start = 0, time.perf_counter()
        for token in llm.generate(tokens, top_k=40, top_p=0.95, min_p=0.05, temp=0.0, repeat_penalty=1.0):
            if n == cfg.decode_tokens or engine.is_eog(token):
                break
            n += 1
        return n / (time.perf_counter() - start)

    figures: dict[str, dict[str, list[float]]] = {}
    native, base = interleaved(cfg.repeats, lambda: native_decode(engine, messages, cfg.decode_tokens), llama_decode)
    figures["decode_native_vs_llama_cpp_python"] = {"value": native, "baseline": base}
    stock = LlamaCppDecoder(str(engine.model_path), cfg.n_ctx, threads, engine.model.native.flash_attn)
    native, base = interleaved(cfg.repeats, lambda: native_decode(engine, messages, cfg.decode_tokens),
                               lambda: stock.decode_rate(tokens, cfg.decode_tokens))
    stock.close()
    figures["decode_native_vs_llama_cpp"] = {"value": native, "baseline": base}
    graphs = engine.perf_counts()

    every_layer = tuple(range(1, engine.n_layer))
    vector = random_vector(engine, every_layer, norm=2.0)

    def steered() -> float:
        engine.steer("bench", vector, 1.0, every_layer)
        return native_decode(engine, messages, cfg.decode_tokens)

    def unsteered() -> float:
        engine.unsteer()
        return native_decode(engine, messages, cfg.decode_tokens)

    on, off = interleaved(cfg.repeats, steered, unsteered)
    engine.unsteer()
    figures["decode_steered_vs_unsteered"] = {"value": on, "baseline": off}

    text = PREFILL_TEXT * (cfg.prefill_tokens // 20 + 2)
    long_prompt = engine.tokenize(text)[: cfg.prefill_tokens]

    def native_prefill() -> float:
        engine.reset()
        return timed_rate(len(long_prompt), lambda: engine.extend(long_prompt, steered=False))

    def llama_prefill() -> float:
        llm.reset()
        return timed_rate(len(long_prompt), lambda: llm.eval(long_prompt))

    native, base = interleaved(cfg.repeats, native_prefill, llama_prefill)
    figures["prefill_native_vs_llama_cpp_python"] = {"value": native, "baseline": base}
    engine.reset()
    llm.close()  # frees its model before the next measurement

    from caa_local.core.datasets import load_ab

    choices = choices_from_items(load_ab(AB_DATASET).items[: cfg.ab_questions])
    layer = engine.n_layer // 2
    sweep_vector = random_vector(engine, (layer,))
    unit = engine.make_term("bench", sweep_vector, 1.0, [layer])
    settings = [(unit.at(scale=m),) for m in cfg.ab_multipliers]
    n_scores = len(choices) * len(settings)

    def redecode() -> None:
        score_ab(engine, choices, settings, positions="all")  # the same batched scorer, every prompt in full

    reuse, naive, full = interleaved(
        cfg.repeats,
        lambda: timed_rate(n_scores, lambda: score_ab(engine, choices, settings)),
        lambda: timed_rate(n_scores, lambda: [score_ab_naive(engine, choices, s) for s in settings]),
        lambda: timed_rate(n_scores, redecode),
    )
    figures["ab_sweep_reuse_vs_naive"] = {"value": reuse, "baseline": naive}
    figures["ab_sweep_reuse_vs_batched_redecode"] = {"value": reuse, "baseline": full}
    figures["steer_change_ms"] = {"value": [scale_latency(engine, cfg.change_repeats)["change_cost_ms"]
                                            for _ in range(cfg.repeats)]}
    ab_tokens = [len(engine.prompt(c.messages)[0]) for c in choices]
    return {"figures": figures, "facts": {"threads": threads, "ab_settings": len(settings),
                                          "stock_threadpool": "a persistent threadpool" if stock.threadpool
                                          else "no threadpool (not found)",
                                          "graphs_reused": f"{graphs['graphs_reused']} times, prompts included, in "
                                                            f"{graphs['single_decodes']} single-token decodes",
                                          "ab_questions": len(choices), "ab_prompt_tokens": max(ab_tokens),
                                          "prefill_tokens": len(long_prompt)}}


def _extract_items(cfg: Config) -> list[Any]:
    """The first pairs of each of the paper's behaviours in turn (mixed lengths)."""
    from caa_local.core.datasets import load_ab

    per = -(-cfg.extract_pairs // len(EXTRACT_BEHAVIORS))
    data = [load_ab(b).items[:per] for b in EXTRACT_BEHAVIORS]
    return [pairs[i] for i in range(per) for pairs in data][: cfg.extract_pairs]


def _torch_group(cfg: Config) -> dict[str, Any]:
    from caa_local.torch.extract import extract, extract_loop
    from caa_local.torch.hf import chat_template_of, load_hf, set_threads

    threads = _engine(cfg).n_threads  # the engine's thread count, so both sides match
    set_threads(threads)
    model, tokenizer, _info = load_hf(cfg.model)

    figures: dict[str, dict[str, list[float]]] = {}
    template = chat_template_of(tokenizer)
    items = _extract_items(cfg)
    batched, loop = interleaved(
        cfg.repeats,
        lambda: timed_rate(len(items), lambda: extract(model, tokenizer, template, items, progress=False)),
        lambda: timed_rate(len(items), lambda: extract_loop(model, tokenizer, template, items, progress=False)),
    )
    figures["extract_batched_vs_loop"] = {"value": batched, "baseline": loop}
    return {"figures": figures, "facts": {"threads": threads, "extract_pairs": len(items)}}


def _steered_story(cfg: Config) -> tuple[Any, list[dict[str, str]], Any, int]:
    """(engine steered at its middle layer with a random norm-2 vector, messages, vector, layer)."""
    from caa_local.bench.chat import random_vector

    engine = _engine(cfg)
    layer = engine.n_layer // 2
    vector = random_vector(engine, (layer,), norm=2.0)
    engine.steer("bench", vector, 1.0, (layer,))
    return engine, [{"role": "user", "content": STORY}], vector, layer


def _decode_native_side(cfg: Config) -> dict[str, Any]:
    """One side of decode_native_vs_transformers, in a process that never imports torch."""
    engine, messages, _vector, _layer = _steered_story(cfg)
    native_decode(engine, messages, cfg.torch_decode_tokens)  # warm-up
    rate = native_decode(engine, messages, cfg.torch_decode_tokens)
    return {"figures": {"decode_native_vs_transformers": {"value": [rate]}}, "facts": {"threads": engine.n_threads}}


def _decode_transformers_side(cfg: Config) -> dict[str, Any]:
    """The other side: transformers fp32 with the torch_steer hook, prefill untimed, then a
    greedy loop of single-token forward passes with a KV cache (leaner than model.generate)."""
    from caa_local.torch.decode import steered_decode_rate
    from caa_local.torch.hf import load_hf, set_threads

    engine, messages, vector, layer = _steered_story(cfg)
    set_threads(engine.n_threads)
    model, _tokenizer, _info = load_hf(cfg.model)
    tokens, steer_from = engine.prompt(messages)

    def hf_decode() -> float:
        return steered_decode_rate(model, tokens, vector, layer, steer_from, cfg.torch_decode_tokens, engine.is_eog)

    hf_decode()  # warm-up
    return {"figures": {"decode_native_vs_transformers": {"baseline": [hf_decode()]}}, "facts": {}}


def _rss_generate_group(cfg: Config) -> dict[str, Any]:
    engine = _engine(cfg)
    engine.generate([{"role": "user", "content": STORY}], _greedy(cfg.decode_tokens))
    kv_bytes = engine.n_ctx * engine.model.kv_bytes_per_token
    budget = (engine.model_path.stat().st_size + kv_bytes) / (1 << 20) + 150
    return {"figures": {"peak_rss_generate_mib": {"value": [peak_rss_mib()]}},
            "facts": {"rss_budget_mib": budget, "kv_cache_mib": kv_bytes / (1 << 20),
                      "gguf_mib": engine.model_path.stat().st_size / (1 << 20), "n_ctx": engine.n_ctx}}


def _rss_extract_group(cfg: Config) -> dict[str, Any]:
    from caa_local.torch.extract import extract
    from caa_local.torch.hf import chat_template_of, load_hf, set_threads

    set_threads(cfg.threads)
    model, tokenizer, _info = load_hf(cfg.model)
    extract(model, tokenizer, chat_template_of(tokenizer), _extract_items(cfg), progress=False)
    return {"figures": {"peak_rss_extract_mib": {"value": [peak_rss_mib()]}}, "facts": {}}


def _native_extract_groups(cfg: Config, rss_only: bool) -> dict[str, Any]:
    """extract --backend native: pairs/s against torch's batched extraction (same GGUF, pairs and
    threads, alternated in one process), or, in a fresh process, its peak RSS and budget."""
    from caa_local.core.extraction import encode_pairs
    from caa_local.engine import reads
    from caa_local.engine.engine import Engine

    engine = Engine(cfg.model, n_ctx=64, n_threads=cfg.threads)  # the reader has its own context
    items = _extract_items(cfg)
    if rss_only:
        reads.extract(engine, items)
        max_len = max(len(s) for p in encode_pairs(engine.tokenize, engine.template, items, "answer-letter")
                      for s in p.seqs)
        kv = (reads.max_pairs(engine, 8, max_len) + 1) * reads.stream_bytes(engine, max_len)
        gguf = engine.model_path.stat().st_size
        return {"figures": {"peak_rss_extract_native_mib": {"value": [peak_rss_mib()]}},
                "facts": {"rss_extract_native_budget_mib": (gguf + kv) / (1 << 20) + 200,
                          "extract_kv_mib": kv / (1 << 20)}}
    from caa_local.torch.extract import extract
    from caa_local.torch.hf import chat_template_of, load_hf, set_threads

    set_threads(engine.n_threads)
    model, tokenizer, _info = load_hf(cfg.model)
    template = chat_template_of(tokenizer)
    native, base = interleaved(
        cfg.repeats,
        lambda: timed_rate(len(items), lambda: reads.extract(engine, items)),
        lambda: timed_rate(len(items), lambda: extract(model, tokenizer, template, items, progress=False)),
    )
    return {"figures": {"extract_native_vs_torch": {"value": native, "baseline": base}},
            "facts": {"threads": engine.n_threads, "extract_pairs": len(items)}}


def _rpc_group(cfg: Config) -> dict[str, Any]:
    """Decode with every layer on the RPC worker the runner started (cfg.rpc) vs the same model local."""
    from caa_local.engine.engine import Engine

    assert cfg.rpc, "the runner starts a worker for this group"
    remote = Engine(cfg.model, n_ctx=cfg.n_ctx, n_threads=cfg.threads, n_gpu_layers=-1, rpc=[cfg.rpc])
    local = _engine(cfg)
    messages = [{"role": "user", "content": STORY}]
    over_rpc, on_cpu = interleaved(cfg.repeats, lambda: native_decode(remote, messages, cfg.decode_tokens),
                                   lambda: native_decode(local, messages, cfg.decode_tokens))
    # Neither model is freed (freeing talks to the worker): the process ends with os._exit.
    return {"figures": {"decode_rpc_local_vs_cpu": {"value": over_rpc, "baseline": on_cpu}},
            "facts": {"threads": local.n_threads}}


def _condition_group(cfg: Config) -> dict[str, Any]:
    """What a condition costs the prefill: it is read from the unsteered prefix decode itself, so
    the extra work is the eval callback on the watched block and reading its rows of the message."""
    from caa_local.core.locate import load_vector
    from caa_local.engine.engine import Engine, Sampling

    plain = Engine(cfg.model, n_ctx=cfg.n_ctx, n_threads=cfg.threads)
    gated = Engine(plain.model, cfg.n_ctx, cfg.threads)
    behavior, condition = load_vector("sentiment")[1], load_vector("work")[1]
    plain.steer("sentiment", behavior, 1.0)
    gated.set_steering([gated.make_term("sentiment", behavior, 1.0).with_conditions(
        [gated.make_condition("work", condition)])])
    notes = " ".join((PREFILL_TEXT * (cfg.prefill_tokens // 20 + 2)).split()[: max(cfg.prefill_tokens * 3 // 4, 8)])
    messages = [{"role": "user", "content": f"Here are my meeting notes: {notes} Summarise them for my manager."}]
    one = Sampling(temperature=0.0, max_tokens=1)

    def prefill(engine: Engine) -> float:
        engine.reset()
        start = time.perf_counter()
        engine.generate(messages, one)
        return time.perf_counter() - start

    with_condition, without = interleaved(cfg.repeats, lambda: prefill(gated), lambda: prefill(plain))
    n_tokens = len(plain.prompt(messages)[0])
    return {"figures": {"condition_prefill_overhead": {"value": with_condition, "baseline": without}},
            "facts": {"condition_prompt_tokens": n_tokens}}


GROUPS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "native": _native_group, "torch": _torch_group,
    "decode_native_side": _decode_native_side, "decode_transformers_side": _decode_transformers_side,
    "rss_generate": _rss_generate_group, "rss_extract": _rss_extract_group,
    "native_extract": lambda cfg: _native_extract_groups(cfg, False),
    "rss_extract_native": lambda cfg: _native_extract_groups(cfg, True),
    "serve": serve_group, "condition": _condition_group, "rpc": _rpc_group, "batch": batch_group,
    "calibrate": calibrate_group,
}


def main(argv: list[str]) -> None:
    group, config_path, out_path = argv
    fields = json.loads(Path(config_path).read_text(encoding="utf-8"))
    fields["ab_multipliers"] = tuple(fields["ab_multipliers"])
    result = GROUPS[group](Config(**fields))
    result["peak_rss_mib"] = peak_rss_mib()
    Path(out_path).write_text(json.dumps(result), encoding="utf-8")
    os._exit(0)  # skip interpreter teardown (torch and llama.cpp threads): the result is written


if __name__ == "__main__":
    main(sys.argv[1:])
