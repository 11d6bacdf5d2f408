"""The measurements of `caa-local bench`, each group run in a fresh worker process.

``python -m caa_local.bench.tasks GROUP CONFIG.json OUT.json`` writes ``{"figures": {name:
{"value": [...], "baseline": [...]}}, "peak_rss_mib": ..., "facts": {...}}``. A worker
process per group keeps torch out of the llama.cpp comparisons and gives each peak-RSS
figure a process of its own. Every comparison runs both sides in one process, alternating
(A B, B A, A B, ...) after one untimed warm-up each, so drift on a shared machine hits both;
the figures are rates (higher is better), one per run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STORY = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle."
PREFILL_TEXT = ("The lighthouse stood on a rock at the edge of the bay, and every night its keeper climbed "
                "the one hundred and twelve steps to trim the wick, polish the lens and watch the sea. ")
AB_DATASET = "sentiment"
EXTRACT_BEHAVIORS = ("coordinate-other-ais", "corrigible-neutral-HHH", "hallucination", "myopic-reward",
                     "survival-instinct", "sycophancy", "refusal")


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
    from caa_local.engine.scoring import Setting, choices_from_items, score_ab_naive

    engine = _engine(cfg)
    threads = engine.n_threads
    llm = Llama(str(engine.model_path), n_ctx=cfg.n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
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
    settings = [Setting(sweep_vector, m, (layer,)) for m in cfg.ab_multipliers]
    n_scores = len(choices) * len(settings)

    def redecode() -> None:
        engine.score_ab(choices, settings, positions="all")  # the same batched scorer, every prompt in full

    reuse, naive, full = interleaved(
        cfg.repeats,
        lambda: timed_rate(n_scores, lambda: engine.score_ab(choices, settings)),
        lambda: timed_rate(n_scores, lambda: [score_ab_naive(engine, choices, s) for s in settings]),
        lambda: timed_rate(n_scores, redecode),
    )
    figures["ab_sweep_reuse_vs_naive"] = {"value": reuse, "baseline": naive}
    figures["ab_sweep_reuse_vs_batched_redecode"] = {"value": reuse, "baseline": full}
    figures["steer_change_ms"] = {"value": [scale_latency(engine, cfg.change_repeats)["change_cost_ms"]
                                            for _ in range(cfg.repeats)]}
    ab_tokens = [len(engine.prompt(c.messages)[0]) for c in choices]
    return {"figures": figures, "facts": {"threads": threads, "ab_settings": len(settings),
                                          "ab_questions": len(choices), "ab_prompt_tokens": max(ab_tokens),
                                          "prefill_tokens": len(long_prompt)}}


def _extract_items(cfg: Config) -> list[Any]:
    """The first pairs of each of the paper's behaviours in turn (mixed lengths)."""
    from caa_local.core.datasets import load_ab

    per = -(-cfg.extract_pairs // len(EXTRACT_BEHAVIORS))
    data = [load_ab(b).items[:per] for b in EXTRACT_BEHAVIORS]
    return [pairs[i] for i in range(per) for pairs in data][: cfg.extract_pairs]


def _torch_group(cfg: Config) -> dict[str, Any]:
    import torch

    from caa_local.bench.chat import random_vector
    from caa_local.torch.extract import extract, extract_loop
    from caa_local.torch.hf import chat_template_of, load_hf
    from caa_local.torch.packed import _cache_arg
    from caa_local.torch.steer import steer

    engine = _engine(cfg)
    threads = engine.n_threads
    torch.set_num_threads(threads)
    model, tokenizer, _info = load_hf(cfg.model)
    messages = [{"role": "user", "content": STORY}]
    tokens, steer_from = engine.prompt(messages)
    layer = engine.n_layer // 2
    vector = random_vector(engine, (layer,), norm=2.0)
    engine.steer("bench", vector, 1.0, (layer,))

    def hf_decode() -> float:
        """transformers fp32 with the torch_steer hook: prefill untimed, then a greedy loop of
        single-token forward passes with a KV cache (leaner than model.generate)."""
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.inference_mode(), steer(model, vector, 1.0, [layer], from_position=steer_from):
            out = model(input_ids=torch.tensor([tokens]), use_cache=True, **{_cache_arg(model): cache})
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            n, start = 0, time.perf_counter()
            while n < cfg.torch_decode_tokens and not engine.is_eog(int(next_id)):
                n += 1
                out = model(input_ids=next_id, use_cache=True, **{_cache_arg(model): cache})
                next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            return n / (time.perf_counter() - start)

    figures: dict[str, dict[str, list[float]]] = {}
    native, base = interleaved(
        cfg.repeats, lambda: native_decode(engine, messages, cfg.torch_decode_tokens), hf_decode)
    figures["decode_native_vs_transformers"] = {"value": native, "baseline": base}

    template = chat_template_of(tokenizer)
    items = _extract_items(cfg)
    batched, loop = interleaved(
        cfg.repeats,
        lambda: timed_rate(len(items), lambda: extract(model, tokenizer, template, items, progress=False)),
        lambda: timed_rate(len(items), lambda: extract_loop(model, tokenizer, template, items, progress=False)),
    )
    figures["extract_batched_vs_loop"] = {"value": batched, "baseline": loop}
    return {"figures": figures, "facts": {"threads": threads, "extract_pairs": len(items)}}


def _rss_generate_group(cfg: Config) -> dict[str, Any]:
    engine = _engine(cfg)
    engine.generate([{"role": "user", "content": STORY}], _greedy(cfg.decode_tokens))
    meta, arch = engine.meta, engine.architecture
    n_head = int(meta(f"{arch}.attention.head_count") or 1)
    n_head_kv = int(meta(f"{arch}.attention.head_count_kv") or n_head)
    k_dim = int(meta(f"{arch}.attention.key_length") or engine.n_embd // n_head)
    v_dim = int(meta(f"{arch}.attention.value_length") or k_dim)
    kv_bytes = engine.n_ctx * engine.n_layer * n_head_kv * (k_dim + v_dim) * 2  # f16 K and V
    budget = (engine.model_path.stat().st_size + kv_bytes) / (1 << 20) + 150
    return {"figures": {"peak_rss_generate_mib": {"value": [peak_rss_mib()]}},
            "facts": {"rss_budget_mib": budget, "kv_cache_mib": kv_bytes / (1 << 20),
                      "gguf_mib": engine.model_path.stat().st_size / (1 << 20), "n_ctx": engine.n_ctx}}


def _rss_extract_group(cfg: Config) -> dict[str, Any]:
    import torch

    from caa_local.torch.extract import extract
    from caa_local.torch.hf import chat_template_of, load_hf

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer, _info = load_hf(cfg.model)
    extract(model, tokenizer, chat_template_of(tokenizer), _extract_items(cfg), progress=False)
    return {"figures": {"peak_rss_extract_mib": {"value": [peak_rss_mib()]}}, "facts": {}}


GROUPS: dict[str, Callable[[Config], dict[str, Any]]] = {
    "native": _native_group, "torch": _torch_group,
    "rss_generate": _rss_generate_group, "rss_extract": _rss_extract_group,
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
