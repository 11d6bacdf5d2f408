"""`caa-local bench`: every speed claim measured side by side in one run, as JSON rows.

A row is ``{"name", "value", "unit", "baseline", "ratio", "min", "max", "runs", "target",
"target_op", "met", "note", "cpu", "cores", "threads"}``. Comparison rows carry two measured
rates, ``value`` (ours) and ``baseline``, as medians over runs, and ``ratio`` = value /
baseline (higher is better); their ``min``/``max`` span the per-run ratios (each run pairs
the two sides, alternated in one process). Single-figure rows have ``baseline`` and ``ratio``
null and ``min``/``max`` over runs of ``value``. The measurements are in bench_tasks.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from caa_local.bench.measure import Config
from caa_local.core.errors import CaaError

Row = dict[str, Any]
# name -> (unit, target operator, target, what is compared); a target of None is informative.
SPECS: dict[str, tuple[str, str | None, float | None, str]] = {
    "decode_steered_vs_unsteered": (
        "tok/s", ">=", 0.97,
        "native decode steered at every steerable layer (the worst case) vs no vector"),
    "decode_native_vs_llama_cpp_python": (
        "tok/s", ">=", 1.03,
        "Engine.generate vs llama-cpp-python Llama.generate: same GGUF, threads, attention, greedy decoding, "
        "prompt decoded untimed"),
    "decode_native_vs_llama_cpp": (
        "tok/s", ">=", 0.98,
        "Engine.generate (wall clock, all per-token work) vs stock llama.cpp through its C API with "
        "{stock_threadpool}: same GGUF, context, threads, greedy sampler; llama.cpp's own eval + "
        "sampling time per token (llama.cpp reused our context's graph {graphs_reused})"),
    "decode_rpc_local_vs_cpu": (
        "tok/s", None, None,
        "every layer on one loopback `caa-local rpc-worker` (llama.cpp's RPC backend) vs the same "
        "model on the local CPU: what the protocol costs per token, before any network"),
    "decode_native_vs_transformers": (
        "tok/s", ">=", 6.5,
        "both steered at one layer: native vs transformers fp32 with the torch_steer hook "
        "(a greedy loop of cached single-token passes, leaner than model.generate); each side in "
        "fresh processes of its own, alternated"),
    "prefill_native_vs_llama_cpp_python": (
        "tok/s", None, None, "a {prefill_tokens}-token prompt: Session.decode vs Llama.eval"),
    "ab_sweep_reuse_vs_naive": (
        "scores/s", ">=", 4.0,
        "{ab_questions} questions x {ab_settings} settings: score_ab (unsteered prefix KV decoded once) "
        "vs score_ab_naive (the prompt decoded anew for every scored token)"),
    "ab_sweep_reuse_vs_batched_redecode": (
        "scores/s", None, None,
        "score_ab vs the same batched scorer decoding every prompt in full for every setting"),
    "extract_batched_vs_loop": (
        "pairs/s", ">=", 3.0,
        "{extract_pairs} pairs from the paper's datasets: extract (common prefix once, each pair's "
        "shared part once, packed batches) vs extract_loop (one forward pass per prompt, the "
        "straightforward reference)"),
    "chat_startup_s": ("s", "<=", 1.5, "`caa-local chat` spawned in a terminal until its first prompt"),
    "steer_change_ms": ("ms", "<=", 50.0, "a /scale command plus the extra time of the next decode"),
    "peak_rss_generate_mib": (
        "MiB", "<=", None,
        "fresh process generating with n_ctx {n_ctx}; target: GGUF {gguf_mib:.0f} MiB + KV cache "
        "{kv_cache_mib:.0f} MiB + 150 MiB"),
    "peak_rss_extract_mib": ("MiB", None, None, "fresh process: load the model in transformers, extract"),
    "extract_native_vs_torch": (
        "pairs/s", ">=", 1.0,
        "{extract_pairs} pairs: extract --backend native (llama.cpp on the GGUF) vs the torch path's "
        "batched extraction (transformers fp32 on the same GGUF), same threads"),
    "peak_rss_extract_native_mib": (
        "MiB", "<=", None,
        "fresh process: extract --backend native; target: GGUF + its KV cache ({extract_kv_mib:.0f} MiB) "
        "+ 200 MiB, and under a third of peak_rss_extract_mib"),
    "serve_decode_vs_engine": (
        "tok/s", ">=", 0.95,
        "streamed tokens/s through `caa-local serve` (HTTP, SSE) vs Engine.generate in-process: same model, "
        "threads and greedy settings, prefill excluded"),
    "serve_concurrent_vs_serial": (
        "tok/s", ">=", 1.2,
        "4 requests with 4 different steerings at once on a 2-slot server vs one after another on a 1-slot server"),
    "serve_first_token_ms": ("ms", None, None, "request sent to first streamed token, a ~50-token prompt"),
    "condition_prefill_overhead": (
        "s", "<=", 1.03,
        "prefill + 1 token of a {condition_prompt_tokens}-token work prompt: sentiment gated on the `work` "
        "condition (read from the same decode) vs sentiment applied plainly; ratio of times"),
    "serve_batch_mixed_vs_serial": (
        "tok/s", ">=", 1.5,
        "8 concurrent greedy requests with 8 different steerings (one none), {batch_tokens} tokens each, on a "
        "--parallel 8 server (continuous batching) vs the same requests one after another"),
    "batch_vs_llama_cpp_batched": (
        "tok/s", ">=", 0.9,
        "{batch_sequences} sequences, each steered differently (per-row directions), {batch_tokens} greedy tokens "
        "each: aggregate decode tokens/s of Batch.run vs stock llama.cpp decoding {batch_sequences} unsteered "
        "sequences per llama_decode through its C API (same GGUF, one KV stream per sequence, threads)"),
    "llama_cpp_batched_vs_single": (
        "tok/s", None, None,
        "stock llama.cpp through its C API: {batch_sequences} unsteered sequences per llama_decode vs one "
        "(aggregate decode tokens/s, same context and threads): what batching gains on this machine at all"),
    "calibrate_vs_before": (
        "calibrations/s", ">=", 3.0,
        "`calibrate {calibrate_vector}` in-process (layer, strength, card): the search with batched "
        "conversations (picked {calibrate_search}) vs the exhaustive walk one conversation at a time "
        "(picked {calibrate_walk}); one run each, --quick sizes under --quick; the strength phase alone, "
        "walk vs search: {calibrate_strength}"),
    "batch_steering_overhead": (
        "tok/s", ">=", 0.97,
        "one steered sequence in a Batch: directions added per row at the blocks' outputs vs llama.cpp's "
        "control vector"),
}
REQUIRED = tuple(name for name in SPECS if name != "ab_sweep_reuse_vs_batched_redecode")
WORKER_TIMEOUT_S = 1800


def machine() -> dict[str, Any]:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
    return {"cpu": cpu, "cores": cores}


def run_worker(group: str, cfg: Config) -> dict[str, Any]:
    """Run one measurement group of bench_tasks in a fresh Python process."""
    with tempfile.TemporaryDirectory(prefix="caa-bench-") as tmp:
        config_path, out_path = Path(tmp) / "config.json", Path(tmp) / "out.json"
        config_path.write_text(json.dumps(dataclasses.asdict(cfg)), encoding="utf-8")
        command = [sys.executable, "-m", "caa_local.bench.tasks", group, str(config_path), str(out_path)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise CaaError(f"bench {group}: no result after {WORKER_TIMEOUT_S} s") from None
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise CaaError(f"bench {group}: the worker failed with exit code {proc.returncode}:\n{tail}")
        return json.loads(out_path.read_text(encoding="utf-8"))


def startup_times(cfg: Config, timeout: float = 60.0) -> list[float]:
    """Seconds from spawning `caa-local chat` in a pseudo-terminal to its first prompt."""
    from caa_local.bench.chat import startup_times as measure

    return measure(cfg.startup_runs, cfg.threads, cfg.model, timeout)


def run(cfg: Config, echo: Callable[[str], None] = lambda _text: None) -> list[Row]:
    """Every measurement, one worker process per group; the rows in SPECS order."""
    figures: dict[str, dict[str, list[float]]] = {}
    facts: dict[str, Any] = {}
    steps = [("native", "decode, prefill, A/B sweep, multiplier change (llama.cpp, llama-cpp-python)"),
             ("torch", "extraction batched vs loop"),
             ("rss_generate", "peak RSS of generation"), ("rss_extract", "peak RSS of extraction"),
             ("native_extract", "extraction native vs torch"), ("rss_extract_native", "peak RSS of native extraction"),
             ("serve", "the server: HTTP vs in-process decode, concurrent slots, first token"),
             ("condition", "prefill with a condition vs without"),
             ("batch", "many steered sequences per decode vs stock llama.cpp's batching"),
             ("calibrate", "calibration: the batched search vs the walk"),
             ("rpc", "decode with every layer on a loopback RPC worker")]
    for group, what in steps:
        echo(f"bench: {what} ...")
        if group == "rpc":
            with rpc_worker(cfg.threads) as endpoint:
                result = run_worker(group, dataclasses.replace(cfg, rpc=endpoint))
        else:
            result = run_worker(group, cfg)
        figures.update(result["figures"])
        facts.update(result["facts"])
    echo("bench: decode vs transformers, each side in fresh processes ...")
    sides = ("decode_native_side", "decode_transformers_side")
    for r in range(cfg.repeats):
        for group in sides if r % 2 == 0 else reversed(sides):
            for name, series in run_worker(group, cfg)["figures"].items():
                for key, values in series.items():
                    figures.setdefault(name, {}).setdefault(key, []).extend(values)
    echo("bench: chat start-up ...")
    figures["chat_startup_s"] = {"value": startup_times(cfg)}
    return build_rows(figures, facts, {**machine(), "threads": facts.get("threads", cfg.threads)})


@contextlib.contextmanager
def rpc_worker(threads: int) -> Iterator[str]:
    """A `caa-local rpc-worker` on a free loopback port for the duration of the block."""
    from caa_local.engine.rpc import wait_for_worker

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    worker = subprocess.Popen([sys.executable, "-m", "caa_local.cli", "rpc-worker", "--port", str(port),
                               "--threads", str(threads)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_worker(worker, endpoint)
        yield endpoint
    finally:
        worker.kill()
        worker.wait()


def build_rows(figures: dict[str, dict[str, list[float]]], facts: dict[str, Any],
               where: dict[str, Any]) -> list[Row]:
    rows = []
    for name, (unit, op, target, note) in SPECS.items():
        if name not in figures:
            continue
        if name == "peak_rss_generate_mib":
            target = facts.get("rss_budget_mib")
        if name == "peak_rss_extract_native_mib":
            torch_peak = figures.get("peak_rss_extract_mib", {}).get("value")
            limits = [facts.get("rss_extract_native_budget_mib"), statistics.median(torch_peak) / 3 if torch_peak else None]
            target = min((x for x in limits if x), default=None)
        values, base = figures[name]["value"], figures[name].get("baseline")
        value = statistics.median(values)
        if base:
            baseline = statistics.median(base)
            ratio: float | None = value / baseline
            spread = [v / b for v, b in zip(values, base)]
            headline = ratio
        else:
            baseline, ratio, spread, headline = None, None, values, value
        met = None if target is None else (headline >= target if op == ">=" else headline <= target)
        rows.append({
            "name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio,
            "min": min(spread), "max": max(spread), "runs": len(values),
            "target": target, "target_op": op if target is not None else None, "met": met,
            "note": _note(note, facts), **where,
        })
    return rows


def _note(template: str, facts: dict[str, Any]) -> str:
    try:
        return template.format(**facts)
    except (KeyError, ValueError):
        return template


def check_rows(rows: Sequence[Row]) -> None:
    """The JSON contract: every required name present, every figure finite and positive."""
    names = {row["name"] for row in rows}
    missing = [name for name in REQUIRED if name not in names]
    if missing:
        raise CaaError(f"bench results: missing rows {', '.join(missing)}")
    for row in rows:
        for key in ("value", "baseline", "ratio"):
            figure = row.get(key)
            if figure is not None and not (math.isfinite(figure) and figure > 0):
                raise CaaError(f"bench results: {row['name']}.{key} is {figure!r}: expected a positive number")


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _target(row: Row) -> str:
    if row.get("target") is None:
        return "-"
    suffix = "x" if row["ratio"] is not None else f" {row['unit']}"
    return f"{'>=' if row['target_op'] == '>=' else '<='} {_num(row['target'])}{suffix}"


def _met(row: Row) -> str:
    return "-" if row.get("met") is None else ("met" if row["met"] else "NOT met")


def _result(row: Row) -> tuple[str, str, str]:
    """(value, baseline, headline with its run range)."""
    if row["ratio"] is not None:
        return (f"{_num(row['value'])} {row['unit']}", f"{_num(row['baseline'])} {row['unit']}",
                f"{row['ratio']:.2f}x ({row['min']:.2f}-{row['max']:.2f})")
    return (f"{_num(row['value'])} {row['unit']}", "-", f"{_num(row['min'])}-{_num(row['max'])}")


def _machine_line(row: Row) -> str:
    threads = row.get("threads", "?")
    return (f"{row.get('cpu', 'an unknown CPU')} ({row.get('cores', '?')} cores, {threads} "
            f"thread{'' if threads == 1 else 's'})")


def format_table(rows: Sequence[Row]) -> str:
    header = ("measure", "value", "baseline", "ratio / range", "target", "met")
    lines = [header] + [(row["name"], *_result(row), _target(row), _met(row)) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    if rows:
        first = rows[0]
        text.append(f"\n{_machine_line(first)}; medians of {max(row['runs'] for row in rows)} runs "
                    "(per-run range in brackets)")
    return "\n".join(text)


def render_markdown(rows: Sequence[Row]) -> str:
    """The README's performance section, from the JSON rows."""
    first = rows[0] if rows else {}
    runs = max((row["runs"] for row in rows), default=0)
    out = [
        "## Performance", "",
        f"Measured with `caa-local bench` on {_machine_line(first)}: medians of {runs} runs, "
        "with the two sides of every ratio alternated in one process; ranges are per-run minimum "
        "and maximum.", "",
        "| Measure | Ours | Baseline | Ratio or range | Target | Met |",
        "|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        value, baseline, headline = _result(row)
        out.append(f"| `{row['name']}` [{i}] | {value} | {baseline} | {headline} | {_target(row)} | {_met(row)} |")
    out.append("")
    out += [f"{i}. {row.get('note', '')}" for i, row in enumerate(rows, 1)]
    return "\n".join(out) + "\n"
