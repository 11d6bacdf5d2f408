"""Make the shipped vectors for the default model: `make vectors` runs this.

1. extract (torch, train split) every behavior's CAA vector at every steerable layer;
2. normalize per layer across behaviors (the paper's normalization): the seven paper
   behaviors together, the three demo behaviors together;
3. choose a layer per behavior on the held-out validation split with the native engine:
   A/B p(match) at multipliers -1 / +1 at every layer, keeping the layer with the largest
   p(+1) - p(-1);
4. demo behaviors only: judge-free metric curves of open-ended answers to held-out prompts
   over multipliers at the best A/B layers, with a fluency guard: the layer where the metric
   rises monotonically over the most multipliers while fluent, the strongest fluent multiplier;
5. write vectors/*.gguf (recommended layer and multiplier in their metadata) and the
   measured tables: vectors/results.json and vectors/README.md.

Intermediate results live in build/vectors-work/, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from caa_local.core.atomic import write_json, write_text
from caa_local.core.datasets import DEMO_BEHAVIORS, PAPER_BEHAVIORS, load_ab, load_open_ended, split
from caa_local.core.vector import ControlVector

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "vectors-work"
OUT = ROOT / "vectors"
DEMO_METRIC = {"sentiment": "sentiment", "formality": "formality", "enthusiasm": "enthusiasm"}
DEMO_MULTIPLIERS = [-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
# The paper's read position (the answer letter) carries almost nothing on a 135M model; the
# demo vectors average over the whole answer text instead (measured: see vectors/README.md).
DEMO_READ = "answer-text"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def extract_all(behaviors: list[str], train_limit: int, batch_size: int) -> None:

    from caa_local.torch.extract import extract
    from caa_local.torch.hf import chat_template_of, load_hf

    todo = [b for b in behaviors if not (WORK / "raw" / f"{b}.gguf").exists()]
    if not todo:
        return
    model, tokenizer, info = load_hf(None)
    template = chat_template_of(tokenizer)
    for behavior in todo:
        data = load_ab(behavior)
        items = split(data.items, "train")[:train_limit]
        log(f"extract {behavior}: {len(items)} train pairs")
        read = DEMO_READ if behavior in DEMO_BEHAVIORS else "answer-letter"
        vector = extract(model, tokenizer, template, items, batch_size, None, read,
                         progress=False, behavior=behavior, dataset_sha256=data.sha256, info=info)
        vector.with_metadata(split="train").save(WORK / "raw" / f"{behavior}.gguf", force=True)


def normalize_group(behaviors: list[str]) -> dict[str, ControlVector]:
    from caa_local.core.normalize import normalize

    return normalize({b: ControlVector.load(WORK / "raw" / f"{b}.gguf") for b in behaviors})


def layer_sweep(engine: Any, behavior: str, vector: ControlVector, val_limit: int) -> dict[str, Any]:
    from caa_local.eval.ab import ab_sweep

    cache = WORK / "sweeps" / f"{behavior}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    items = split(load_ab(behavior).items, "val")[:val_limit]
    log(f"A/B layer sweep {behavior}: {len(items)} validation questions x {len(vector.layers)} layers")
    result = ab_sweep(engine, vector, items, vector.layers, [-1.0, 0.0, 1.0])
    rows = result.rows()
    write_json(cache, {"rows": rows, "n": len(items)}, force=True)
    return {"rows": rows, "n": len(items)}


def best_layers(sweep: dict[str, Any], k: int) -> list[int]:
    p = {(r["layer"], r["multiplier"]): r["p_match"] for r in sweep["rows"]}
    layers = sorted({r["layer"] for r in sweep["rows"]})
    return sorted(layers, key=lambda layer: p[(layer, 1.0)] - p[(layer, -1.0)], reverse=True)[:k]


def metric_curve(engine: Any, behavior: str, vector: ControlVector, layer: int,
                 n_prompts: int, max_tokens: int) -> list[dict[str, Any]]:
    from caa_local.eval.open_ended import open_ended
    from caa_local.eval.metrics import perplexity, summarize
    from caa_local.core.templates import user_turn

    cache = WORK / "curves" / f"{behavior}-L{layer}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    prompts = load_open_ended(behavior)[:n_prompts]
    log(f"open-ended {behavior} @ layer {layer}: {len(prompts)} prompts x {len(DEMO_MULTIPLIERS)} multipliers")
    rows = open_ended(engine, vector, layer, DEMO_MULTIPLIERS, prompts, max_tokens=max_tokens)
    ppl = perplexity(engine, [user_turn(r["prompt"]) for r in rows], [r["answer"] for r in rows])
    for row, value in zip(rows, ppl):
        row["perplexity"] = value
    summary = summarize(rows, [DEMO_METRIC[behavior]])
    write_json(cache, {"summary": summary, "rows": rows}, force=True)
    return {"summary": summary, "rows": rows}


def fluent(summary: list[dict[str, Any]], multiplier: float) -> bool:
    """At most 20% degenerate answers, and median perplexity (of the steered text under the
    unsteered model) at most 3x the unsteered answers'."""
    by_mult = {s["multiplier"]: s for s in summary}
    s = by_mult[multiplier]
    return s["degenerate"] <= 0.2 and s.get("perplexity", math.inf) <= 3 * by_mult[0.0].get("perplexity", math.inf)


def strongest_fluent(summary: list[dict[str, Any]], metric: str) -> float:
    """The recommended multiplier: the positive one with the highest metric while fluent."""
    candidates = [s for s in summary if s["multiplier"] > 0 and fluent(summary, s["multiplier"])]
    return max(candidates, key=lambda s: s[metric])["multiplier"] if candidates else 1.0


def monotone_range(summary: list[dict[str, Any]], metric: str) -> tuple[list[float], float]:
    """The widest run of multipliers around 0 where the metric strictly rises and fluency holds."""
    by_mult = {s["multiplier"]: s for s in summary}

    def ok(m: float) -> bool:
        return fluent(summary, m)

    mults = sorted(by_mult)
    zero = mults.index(0.0)
    lo = hi = zero
    while lo > 0 and ok(mults[lo - 1]) and by_mult[mults[lo - 1]][metric] < by_mult[mults[lo]][metric]:
        lo -= 1
    while hi < len(mults) - 1 and ok(mults[hi + 1]) and by_mult[mults[hi + 1]][metric] > by_mult[mults[hi]][metric]:
        hi += 1
    span = mults[lo : hi + 1]
    return span, by_mult[mults[hi]][metric] - by_mult[mults[lo]][metric]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-limit", type=int, default=100)
    parser.add_argument("--val-limit", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=40)
    parser.add_argument("--candidates", type=int, default=2, help="best A/B layers tried per demo behavior")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=None, help="restrict to these behaviors")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: all cores)")
    args = parser.parse_args()

    groups = [list(PAPER_BEHAVIORS), list(DEMO_BEHAVIORS)]
    wanted = set(args.only) if args.only else None
    extract_all([b for g in groups for b in g if not wanted or b in wanted], args.train_limit, args.batch_size)

    from caa_local.engine.engine import Engine

    engine = Engine(n_ctx=2048, n_threads=args.threads)
    results_path = OUT / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    for group in groups:
        if wanted and not wanted & set(group):
            continue
        normalized = normalize_group(group)
        for behavior in group:
            if wanted and behavior not in wanted:
                continue
            vector = normalized[behavior]
            sweep = layer_sweep(engine, behavior, vector, args.val_limit)
            layer = best_layers(sweep, 1)[0]
            entry: dict[str, Any] = {"sweep": sweep, "layer": layer, "multiplier": 1.0}
            if behavior in DEMO_METRIC:
                metric = DEMO_METRIC[behavior]
                curves = {L: metric_curve(engine, behavior, vector, L, args.prompts, args.max_tokens)
                          for L in best_layers(sweep, args.candidates)}
                ranked = sorted(curves, key=lambda L: (len(monotone_range(curves[L]["summary"], metric)[0]),
                                                       monotone_range(curves[L]["summary"], metric)[1]),
                                reverse=True)
                layer = ranked[0]
                span, gain = monotone_range(curves[layer]["summary"], metric)
                best = strongest_fluent(curves[layer]["summary"], metric)
                entry.update(layer=layer, multiplier=best, metric=metric, span=span, gain=gain,
                             curves={str(L): c["summary"] for L, c in curves.items()},
                             examples=example_pair(curves[layer]["rows"], best))
            results[behavior] = entry
            vector.with_metadata(
                recommended_layer=entry["layer"], recommended_multiplier=entry["multiplier"],
                validation="split val, seed 0, fraction 0.2",
            ).save(OUT / f"{behavior}.gguf", force=True)
            write_json(results_path, results, force=True)
            log(f"{behavior}: layer {entry['layer']}, multiplier {entry['multiplier']}")
    write_text(OUT / "README.md", render_readme(results, args), force=True)


def example_pair(rows: list[dict[str, Any]], multiplier: float) -> dict[str, str]:
    prompt = rows[0]["prompt"]
    answer = {r["multiplier"]: r["answer"] for r in rows if r["prompt"] == prompt}
    return {"prompt": prompt, "unsteered": answer[0.0], "steered": answer[multiplier],
            "multiplier": str(multiplier)}


PAPER_NOTE = """\
# Shipped vectors (default model: SmolLM2-135M-Instruct, Q4_1)

Made by `make vectors` ({command}); every figure below was measured by that run with the
native engine on the held-out validation split (seeded 80/20 split of each behavior's
`generate_dataset.json`; the vectors never saw these questions).

- **The paper's seven behaviors** (`coordinate-other-ais` ... `refusal`): CAA vectors exactly as
  in the paper (mean difference at the answer letter, {train} training pairs per behavior,
  normalized per layer across the seven). The layer is the one with the largest
  p(+1) - p(-1) over all 29 steerable layers. **A model this small does not carry these
  behaviors**: p(match) stays near 0.5 and moves by a few hundredths at most, the size of the
  noise on {val} questions. They are shipped to show the pipeline end to end and as a
  baseline; for the paper's effects extract from a 7B chat model (below).
- **Demo behaviors** (`sentiment`, `formality`, `enthusiasm`): datasets written for this
  project (caa_local/data/demo) with stark contrasts a 135M model can represent, extracted
  with `--read answer-text` (the mean over the whole answer's tokens, not only its letter:
  on this model the letter alone moves nothing visible), normalized across the three. The
  layer and multiplier are chosen on open-ended answers to held-out prompts: the layer
  (among the two best A/B layers) where a judge-free metric rises monotonically over the
  most multipliers while the answers stay fluent (at most 20% degenerate answers, median
  perplexity under the unsteered model at most 3x the unsteered answers'); the multiplier is
  the positive one with the highest metric among the fluent ones.

Each file records `recommended_layer` and `recommended_multiplier` in its metadata
(`caa-local vector list`); `caa-local chat --vector sentiment` uses them.

## A/B p(match) on validation questions at the recommended layer

"""

SEVEN_B = """
## The paper's behaviors on a 7B model

```sh
pip install '.[extract]'
for b in coordinate-other-ais corrigible-neutral-HHH hallucination myopic-reward survival-instinct sycophancy refusal; do
  caa-local extract $b --model meta-llama/Llama-2-7b-chat-hf --device auto --dtype bfloat16 --out raw/$b.gguf
done
caa-local normalize raw/*.gguf --out-dir vectors-7b/
caa-local eval ab --vector vectors-7b/sycophancy.gguf --dataset sycophancy --layers all \\
    --multipliers -1,0,1 --model llama-2-7b-chat.Q4_K_M.gguf --json sweep.json --plot sweep.png
```
`--model` also takes a local HF directory or a GGUF file (transformers dequantizes it).
"""


def render_readme(results: dict[str, Any], args: argparse.Namespace) -> str:
    command = f"scripts/make_vectors.py --train-limit {args.train_limit} --val-limit {args.val_limit}"
    lines = [PAPER_NOTE.format(command=command, train=args.train_limit, val=args.val_limit).rstrip("\n") + "\n"]
    lines += ["| behavior | layer | p(match) at -1 | at 0 | at +1 | questions |", "|---|---|---|---|---|---|"]
    for behavior in [*PAPER_BEHAVIORS, *DEMO_BEHAVIORS]:
        if behavior not in results:
            continue
        entry = results[behavior]
        p = {(r["layer"], r["multiplier"]): r["p_match"] for r in entry["sweep"]["rows"]}
        layer = entry["layer"]
        lines.append(f"| {behavior} | {layer} | {p[(layer, -1.0)]:.3f} | {p[(layer, 0.0)]:.3f} | "
                     f"{p[(layer, 1.0)]:.3f} | {entry['sweep']['n']} |")
    for behavior in DEMO_BEHAVIORS:
        entry = results.get(behavior)
        if not entry or "curves" not in entry:
            continue
        metric, span, example = entry["metric"], entry["span"], entry["examples"]
        lines += ["", f"## {behavior}: layer {entry['layer']}, multipliers {span[0]:+g} .. {span[-1]:+g}", "",
                  f"Mean `{metric}` metric (caa_local/metrics.py) of greedy answers to "
                  f"{entry['curves'][str(entry['layer'])][0]['n']} held-out prompts; monotone and fluent over "
                  f"{span[0]:+g} .. {span[-1]:+g}; recommended multiplier {entry['multiplier']:+g} (the strongest fluent one).", "",
                  f"| multiplier | {metric} | degenerate | perplexity |", "|---|---|---|---|"]
        for s in entry["curves"][str(entry["layer"])]:
            lines.append(f"| {s['multiplier']:+g} | {s[metric]:.3f} | {s['degenerate']:.2f} | "
                         f"{s.get('perplexity', float('nan')):.1f} |")
        lines += ["", f"> **{example['prompt']}**", ">", f"> unsteered: {example['unsteered']}", ">",
                  f"> steered x{float(example['multiplier']):+g}: {example['steered']}"]
    lines.append(SEVEN_B)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
