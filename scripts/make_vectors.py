"""Make the shipped vectors for the default model: `make vectors` runs this.

1. extract (torch, train split) every behavior's CAA vector at every steerable layer;
2. normalize per layer across behaviors (the paper's normalization): the seven paper
   behaviors together, the three demo behaviors together;
3. calibrate each vector (caa_local.eval.calibrate, as `caa-local calibrate` does): the layer
   on the held-out validation split (A/B p(match), or for the demo behaviors the judge-free
   metric of answers at the best A/B layers), then the strongest multipliers that keep
   multi-turn conversations coherent under the chat's own sampling;
4. demo behaviors: check the recommendation at the chat's full default sampling (12 held-out
   three-turn conversations, answers up to the chat's max_tokens): broken-turn rate and metric;
5. write vectors/*.gguf (recommended layer, multipliers and the calibration summary in their
   metadata) and the measured tables: vectors/results.json and vectors/README.md.

Intermediate results live in build/vectors-work/, so an interrupted run resumes;
`--calibrate-only` recalibrates the files already in vectors/ (no torch needed).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from caa_local.core.atomic import write_json, write_text
from caa_local.core.datasets import DEMO_BEHAVIORS, PAPER_BEHAVIORS, load_ab, split
from caa_local.core.vector import ControlVector

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "vectors-work"
OUT = ROOT / "vectors"
DEMO_METRIC = {"sentiment": "sentiment", "formality": "formality", "enthusiasm": "enthusiasm"}
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


def calibrate_vector(engine: Any, behavior: str, vector: ControlVector, args: argparse.Namespace) -> dict[str, Any]:
    from caa_local.eval.calibrate import Settings, calibrate, load_data

    cache = WORK / "calibration" / f"{behavior}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    settings = Settings(metric=DEMO_METRIC.get(behavior, "p_match"), val_limit=args.val_limit,
                        conversations=args.conversations, turns=3, max_tokens=args.max_tokens,
                        mmlu_limit=args.mmlu_limit, candidates=args.candidates, layer_prompts=args.layer_prompts,
                        multipliers=(*(-m for m in (args.multipliers if args.negative_multipliers is None
                                                    else args.negative_multipliers)), *args.multipliers),
                        layers=[vector.recommended_layer()] if args.keep_layers and vector.recommended_layer() else None)
    log(f"calibrate {behavior}")
    summary = calibrate(engine, vector, load_data(behavior, None, settings), settings, log=lambda m: log(f"  {m}"))
    write_json(cache, summary, force=True)
    return summary


def chat_check(engine: Any, behavior: str, vector: ControlVector, summary: dict[str, Any],
               conversations: int) -> dict[str, Any]:
    """The recommendation at the chat's full default sampling, against multiplier 0."""
    from caa_local.eval.calibrate import Settings, load_data, split_prompts
    from caa_local.eval.coherence import Guard, strength_curve

    cache = WORK / "chat-check" / f"{behavior}-L{summary['layer']}-x{summary['recommended_multiplier']:g}.json"
    if cache.exists():
        return json.loads(cache.read_text())

    settings = Settings(metric=summary["metric"], conversations=conversations, turns=3)
    _, convs = split_prompts(load_data(behavior, None, settings).prompts, settings)
    log(f"chat check {behavior}: {len(convs)} conversations x 3 turns at x0 and x{summary['recommended_multiplier']:+g}")
    curve = strength_curve(engine, vector, summary["layer"], convs, [summary["recommended_multiplier"]],
                           Guard(), summary["metric"], seed=1, log=lambda m: log(f"  {m}"))
    check = {"conversations": len(convs), "turns": 3, "seed": 1,
             "points": [{k: p[k] for k in ("multiplier", "metric", "broken", "degenerate", "perplexity_ratio", "passed")
                         if k in p} for p in curve]}
    write_json(cache, check, force=True)
    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-limit", type=int, default=100)
    parser.add_argument("--val-limit", type=int, default=16)
    parser.add_argument("--conversations", type=int, default=12, help="guard conversations per multiplier")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer in the guard's conversations")
    parser.add_argument("--mmlu-limit", type=int, default=24)
    parser.add_argument("--candidates", type=int, default=2, help="best A/B layers probed per demo behavior")
    parser.add_argument("--layer-prompts", type=int, default=6, help="open-ended prompts of that probe")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0],
                        help="strengths tried on each side (outwards until the guard fails)")
    parser.add_argument("--negative-multipliers", type=float, nargs="*", default=None,
                        help="magnitudes tried on the negative side (default: --multipliers)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", nargs="*", default=None, help="restrict to these behaviors")
    parser.add_argument("--calibrate-only", action="store_true", help="recalibrate the files in vectors/")
    parser.add_argument("--chat-check", action="store_true",
                        help="demo behaviors: also check the recommendation with answers up to the chat's 256 tokens")
    parser.add_argument("--keep-layers", action="store_true",
                        help="keep each file's recommended layer; calibrate only the strength")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: all cores)")
    args = parser.parse_args()

    groups = [list(PAPER_BEHAVIORS), list(DEMO_BEHAVIORS)]
    wanted = set(args.only) if args.only else None
    if not args.calibrate_only:
        extract_all([b for g in groups for b in g if not wanted or b in wanted], args.train_limit, args.batch_size)

    from caa_local.engine.engine import Engine
    from caa_local.eval.calibrate import calibrated

    engine = Engine(n_ctx=2048, n_threads=args.threads)
    results_path = OUT / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    for group in groups:
        if wanted and not wanted & set(group):
            continue
        if args.calibrate_only:
            vectors = {b: ControlVector.load(OUT / f"{b}.gguf") for b in group}
        else:
            vectors = normalize_group(group)
        for behavior in group:
            if wanted and behavior not in wanted:
                continue
            start = time.perf_counter()
            summary = calibrate_vector(engine, behavior, vectors[behavior], args)
            entry: dict[str, Any] = {"layer": summary["layer"], "multiplier": summary["recommended_multiplier"],
                                     "negative_limit": summary["negative_limit"], "calibration": summary,
                                     "seconds": round(time.perf_counter() - start, 1)}
            if behavior in DEMO_METRIC and args.chat_check:
                entry["chat_check"] = chat_check(engine, behavior, vectors[behavior], summary, args.conversations)
            results[behavior] = entry
            calibrated(vectors[behavior], summary).save(OUT / f"{behavior}.gguf", force=True)
            write_json(results_path, results, force=True)
            log(f"{behavior}: layer {entry['layer']}, multiplier {entry['multiplier']}, "
                f"negative limit {entry['negative_limit']}")
    write_text(OUT / "README.md", render_readme(results, args), force=True)


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
  on this model the letter alone moves nothing visible), normalized across the three.

Every file is calibrated as `caa-local calibrate` does it (caa_local/eval/calibrate.py): the
layer on held-out data (A/B p(match) on the validation split; for the demo behaviors a
judge-free metric of greedy answers at the best A/B layers), then the strength with the
chat's own sampling (temperature 0.7, top-p 0.95, repeat penalty 1.1) over {conversations}
held-out three-turn conversations per multiplier (answers up to {max_tokens} tokens), going
outwards from 0 until the guard fails: median perplexity of the answers under the
unsteered model at most 2x the unsteered answers', no more broken turns than unsteered
(a loop, a run, or one answer 6x the unsteered median perplexity) and 4-gram repetition at
most 0.1 above. The recommended multiplier is the largest positive one that passes, the
negative limit the largest negative one. `caa-local vector info NAME` shows the whole
calibration (`caa.calibration`: curve, guard values, data, seed, model hash).

**After gibberish, `/reset`.** `/unsteer` stops the steering from the next token (the engine
re-decodes whatever the cache holds with other steering), but the conversation itself stays:
if earlier answers were gibberish, the unsteered model continues them. Measured on this
model: after two answers at `sentiment x8` + `formality x-3`, three unsteered answers kept the
gibberish (perplexity 29, 2.0 and 1.7 under the unsteered model given that history: it
copies), while the same questions in a fresh conversation got ordinary answers. `/reset`
starts a fresh conversation (the system message is kept).

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
    lines = [PAPER_NOTE.format(command=command, train=args.train_limit, val=args.val_limit,
                               conversations=args.conversations, max_tokens=args.max_tokens).rstrip("\n") + "\n"]
    lines += ["| behavior | layer | p(match) at -1 | at 0 | at +1 | questions |", "|---|---|---|---|---|---|"]
    for behavior in [*PAPER_BEHAVIORS, *DEMO_BEHAVIORS]:
        entry = results.get(behavior)
        if entry and "sweep" in entry and entry["layer"] == entry["sweep"].get("layer", entry["layer"]):
            p = {(r["layer"], r["multiplier"]): r["p_match"] for r in entry["sweep"]["rows"]}
            layer = entry["layer"]
            if (layer, 1.0) in p:
                lines.append(f"| {behavior} | {layer} | {p[(layer, -1.0)]:.3f} | {p[(layer, 0.0)]:.3f} | "
                             f"{p[(layer, 1.0)]:.3f} | {entry['sweep']['n']} |")
    for behavior in DEMO_BEHAVIORS:
        entry = results.get(behavior)
        if entry and "calibration" in entry:
            lines += demo_section(behavior, entry)
    lines.append(SEVEN_B)
    return "\n".join(lines) + "\n"


def demo_section(behavior: str, entry: dict[str, Any]) -> list[str]:
    cal = entry["calibration"]
    metric, neg, pos = cal["metric"], cal["negative_limit"], cal["recommended_multiplier"]
    span = f"{neg:+g} .. {pos:+g}" if neg is not None else f"0 .. {pos:+g}"
    choice = cal["layer_choice"]
    how = (f"Layer {cal['layer']} kept from the file (chosen by an earlier run on greedy `{metric}` curves at the "
           "two best A/B layers; `--keep-layers`)." if choice["method"] == "given" else
           f"Layer {cal['layer']} by `{metric}` of greedy answers at x-1/x+1 on {choice['n']} held-out prompts "
           f"among the best A/B layers ({_scores(choice['scores'])}).")
    lines = ["", f"## {behavior}: layer {cal['layer']}, multipliers {span}", "",
             f"{how} Strength: {cal['conversations']} conversations x {cal['turns']} turns per multiplier "
             f"({cal['n']} answers), chat sampling; calibration took {cal['seconds']:.0f} s on the shared 2-core dev machine (1 thread).", "",
             f"| multiplier | {metric} | perplexity ratio | broken turns | repetition | guard |", "|---|---|---|---|---|---|"]
    for point in cal["curve"]:
        verdict = "passes" if point["passed"] else "fails: " + "; ".join(point["failures"])
        lines.append(f"| {point['multiplier']:+g} | {point.get('metric', float('nan')):.3f} | "
                     f"{point['perplexity_ratio']:.2f} | {point['broken']:.0%} | {point['repetition']:.2f} | {verdict} |")
    if cal.get("negative_side"):
        lines += ["", f"Negative multipliers: {cal['negative_side']}."]
    check = entry.get("chat_check")
    if check:
        by = {p["multiplier"]: p for p in check["points"]}
        zero, top = by[0.0], by[pos]
        lines += ["", f"At the chat's full default sampling (answers up to 256 tokens, other seeds), on "
                  f"{check['conversations']} held-out three-turn conversations: `{metric}` {zero['metric']:.3f} "
                  f"unsteered, {top['metric']:.3f} at x{pos:+g}; broken turns {zero['broken']:.0%} unsteered, "
                  f"{top['broken']:.0%} at x{pos:+g} (degenerate: {top['degenerate']:.0%})."]
    examples = {p["multiplier"]: p["example"] for p in cal["curve"]}
    lines += ["", "> last turn of the last conversation", ">", f"> unsteered: {_one_line(examples[0.0])}", ">",
              f"> x{pos:+g}: {_one_line(examples[pos])}"]
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _scores(scores: dict[str, Any]) -> str:
    return ", ".join(f"layer {k}: {v:+.3f}" if v is not None else f"layer {k}: degenerate" for k, v in scores.items())


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
