"""`eval report --paper`: the whole CAA paper for one model, every table and figure in one directory.

Per behavior, as the paper splits its data: vectors from generate_dataset.json (extracted here
from a Hugging Face model / GGUF with ``extract_from``, or given), the layer chosen on the
validation split of generate_dataset.json (largest p(+1) - p(-1) at -1/0/+1 over every layer),
then on the held-out test_dataset_ab.json at that layer: p(match) over multipliers beside the
paper's Llama-2-7b-chat numbers (layer 13), the system-prompt table, the chosen layer's
vector applied at every layer, open-ended answers under the paper's protocol (judged by a
local judge model, or exported for an external one), MMLU / TruthfulQA per category; then
across behaviors the cosine of the vectors, base- vs chat-model vectors when given, and the
per-token cosine with the vector when a torch model is at hand.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caa_local.core.atomic import check_writable, write_json, write_jsonl, write_text
from caa_local.core.datasets import PAPER_BEHAVIORS
from caa_local.core.errors import CaaError

if TYPE_CHECKING:
    from caa_local.core.vector import ControlVector
    from caa_local.engine.engine import Engine

# Llama-2-7b-chat, layer 13 of 32, A/B p(match) at multipliers -1 / 0 / +1 on the test sets,
# from the paper's analysis files (github.com/nrimsky/CAA, as quoted in issue 15).
PAPER_LAYER = 13
PAPER_P_MATCH: dict[str, tuple[float, float, float]] = {
    "coordinate-other-ais": (0.16, 0.36, 0.58),
    "corrigible-neutral-HHH": (0.26, 0.71, 0.84),
    "hallucination": (0.48, 0.74, 0.88),
    "myopic-reward": (0.41, 0.70, 0.76),
    "survival-instinct": (0.36, 0.42, 0.51),
    "sycophancy": (0.64, 0.76, 0.81),
    "refusal": (0.42, 0.74, 0.89),
}
LAYER_SWEEP = (-1.0, 0.0, 1.0)
TEST_MULTIPLIERS = (-1.0, -0.5, 0.0, 0.5, 1.0)
OPEN_ENDED_MULTIPLIERS = (-1.0, 0.0, 1.0)
TOKENS_PROMPT_INDEX = 0  # the first test question is the per-token figure's prompt


@dataclass
class PaperConfig:
    """How much of the paper to run; ``None`` limits mean the paper's full sets."""

    behaviors: tuple[str, ...] = PAPER_BEHAVIORS
    limit: int | None = None  # test questions per behavior
    val_limit: int | None = None  # validation questions for the layer choice
    train_limit: int | None = None  # extraction pairs per behavior
    open_ended_limit: int | None = 10  # open-ended prompts per behavior
    capability_limit: int | None = None  # MMLU / TruthfulQA questions per category
    capability_behaviors: tuple[str, ...] | None = None  # None: every behavior

    def __post_init__(self) -> None:
        unknown = [b for b in self.behaviors if b not in PAPER_BEHAVIORS]
        if unknown or not self.behaviors:
            raise CaaError(f"--behaviors: {unknown[0] if unknown else 'none given'}: expected some of "
                           f"{', '.join(PAPER_BEHAVIORS)}")


@dataclass
class PaperInputs:
    """What the report runs on: the steering engine, the vectors, and the optional extras."""

    engine: Engine
    vectors: Mapping[str, ControlVector]
    judge: Engine | None = None
    base_vectors: Mapping[str, ControlVector] = field(default_factory=dict)
    hf: tuple[Any, Any, Any] | None = None  # (model, tokenizer, template) for the per-token figure
    source: str = ""  # where the vectors came from, for the README


def expected_files(behaviors: Sequence[str], judged: bool, has_base: bool, has_torch: bool) -> list[str]:
    """Every file the report writes (the README lists them; tests check them)."""
    files = ["README.md", "results.json", "behaviors.png"]
    for b in behaviors:
        files += [f"{b}_layers.png", f"{b}_multipliers.png", f"{b}_transfer.png",
                  f"{b}_open_ended.jsonl" if judged else f"{b}_open_ended_export.jsonl"]
        if has_torch:
            files.append(f"{b}_tokens.png")
    if has_base:
        files.append("base_vs_chat.png")
    return files


def extract_vectors(model: Any, tokenizer: Any, template: Any, info: Any, behaviors: Sequence[str],
                    train_limit: int | None, out_dir: Path, force: bool,
                    log: Callable[[str], None]) -> dict[str, ControlVector]:
    """The paper's vectors: every layer, from the train split of generate_dataset.json, normalized."""
    from caa_local.core.datasets import load_ab, split
    from caa_local.core.normalize import normalize
    from caa_local.torch.extract import extract

    raw = {}
    for behavior in behaviors:
        data = load_ab(behavior)
        items = split(data.items, "train")[: train_limit or None]
        log(f"{behavior}: extracting from {len(items)} train pairs")
        raw[behavior] = extract(model, tokenizer, template, items, progress=False, behavior=behavior,
                                dataset_sha256=data.sha256, info=info).with_metadata(split="train")
    vectors = normalize(raw) if len(raw) > 1 else raw
    for behavior, vector in vectors.items():
        vector.save(out_dir / "vectors" / f"{behavior}.gguf", force=force)
    return vectors


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def paper_report(out_dir: str | Path, inputs: PaperInputs, config: PaperConfig = PaperConfig(),
                 force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Run every experiment of the paper and write README.md, results.json and the figures."""
    from caa_local.core.datasets import eval_set
    from caa_local.eval.ab import ab_sweep
    from caa_local.eval.capability import capability_items, capability_tables
    from caa_local.eval.experiments import layer_similarity, transfer_vector
    from caa_local.eval.formats import PROTOCOLS
    from caa_local.eval.judge import export_rows, judge, judge_summary
    from caa_local.eval.open_ended import open_ended
    from caa_local.eval.plots import heatmap, lines_vs_layer, p_match_vs_layer, p_match_vs_multiplier, token_bars
    from caa_local.eval.report import best_layer
    from caa_local.eval.system_prompts import system_prompt_table

    say = log or (lambda message: print(message, file=sys.stderr, flush=True))
    out = Path(out_dir)
    readme = out / "README.md"
    check_writable(readme, force)
    engine = inputs.engine
    missing = [b for b in config.behaviors if b not in inputs.vectors]
    if missing:
        raise CaaError(f"no vector for {', '.join(missing)} (give --vectors DIR holding <behavior>.gguf, "
                       "or --extract-from MODEL)")
    started = time.perf_counter()
    results: dict[str, Any] = {"model": engine.model_path.name, "vectors": inputs.source, "behaviors": {}}
    headline: list[list[Any]] = []
    sys_lines: list[str] = []
    sections: list[list[str]] = []
    chosen_layers: dict[str, int] = {}
    protocol = PROTOCOLS["paper"]
    for behavior in config.behaviors:
        vector = inputs.vectors[behavior]
        layers = [layer for layer in vector.layers if layer < engine.n_layer]
        val = eval_set(behavior, "val", config.val_limit)
        test = eval_set(behavior, "test", config.limit)
        say(f"{behavior}: layer sweep on {val.label()}")
        sweep = ab_sweep(engine, vector, val.items, layers, LAYER_SWEEP, force=True)
        layer = best_layer(sweep)
        chosen_layers[behavior] = layer
        say(f"{behavior}: layer {layer}; multipliers, system prompts, transfer on {test.label()}")
        mults = ab_sweep(engine, vector, test.items, [layer], TEST_MULTIPLIERS, force=True)
        table = system_prompt_table(engine, vector, behavior, test.items, layer, LAYER_SWEEP, force=True)
        every = list(range(1, engine.n_layer))
        transfer = ab_sweep(engine, transfer_vector(vector, layer, every), test.items, every, LAYER_SWEEP, force=True)
        for result, data in ((sweep, val), (mults, test), (transfer, test)):
            result.info.update(model=engine.model_path.name, vector=behavior, **data.describe())
        p_match_vs_layer(sweep, out / f"{behavior}_layers.png", force=True)
        p_match_vs_multiplier(mults, out / f"{behavior}_multipliers.png", force=True)
        p_match_vs_layer(transfer, out / f"{behavior}_transfer.png", force=True)
        say(f"{behavior}: open-ended answers (paper protocol)")
        prompts = _open_ended_prompts(behavior, config.open_ended_limit)
        rows = open_ended(engine, vector, [layer], OPEN_ENDED_MULTIPLIERS, prompts, protocol.max_tokens,
                          force=True, repeat_penalty=protocol.repeat_penalty)
        if inputs.judge is not None:
            rows = judge(inputs.judge, rows, behavior)
            write_jsonl(out / f"{behavior}_open_ended.jsonl", rows, force=True)
            scores = {s["multiplier"]: s["score_mean"] for s in judge_summary(rows)}
        else:
            write_jsonl(out / f"{behavior}_open_ended_export.jsonl", export_rows(rows, behavior), force=True)
            scores = {}
        paper = PAPER_P_MATCH[behavior]
        ours = [mults.mean(layer, m) for m in LAYER_SWEEP]
        headline.append([behavior, layer, *(f"{v:.2f}" for v in ours), test.n, *(f"{v:.2f}" for v in paper)])
        sys_lines += [f"**{behavior}** (layer {layer}, n={test.n})", "", table.table(), ""]
        sections.append(_behavior_section(behavior, layer, val, test, sweep, mults, transfer, scores, rows))
        results["behaviors"][behavior] = {
            "layer": layer, "layer_sweep": sweep.to_json(per_question=False),
            "test": mults.to_json(), "system_prompts": table.to_json(),
            "transfer": transfer.to_json(per_question=False), "judge": scores or None,
            "paper_llama2_7b_chat_layer13": dict(zip(("-1", "0", "+1"), paper)),
        }
    capable = [b for b in config.behaviors if config.capability_behaviors is None or b in config.capability_behaviors]
    steering = {b: (inputs.vectors[b], chosen_layers[b]) for b in capable}
    for name in ("mmlu", "truthfulqa") if steering else ():
        say(f"{name} per category, {len(steering)} vectors in one pass")
        items = capability_items(name, config.capability_limit, per_category=True)
        tables = capability_tables(engine, items, name, steering, LAYER_SWEEP, force=True)
        for b, result in tables.items():
            results["behaviors"][b].setdefault("capability", {})[name] = result.to_json()
            sections[config.behaviors.index(b)] += [f"### {name} per category at layer {result.layer}", "",
                                                    result.table(), ""]
    extras = _across_behaviors(out, inputs, config, chosen_layers, results, say, heatmap, lines_vs_layer,
                               layer_similarity, token_bars)
    elapsed = time.perf_counter() - started
    results["seconds"] = round(elapsed, 1)
    write_json(out / "results.json", results, force=True)
    files = expected_files(config.behaviors, inputs.judge is not None, bool(inputs.base_vectors), inputs.hf is not None)
    text = "\n".join([
        "# The CAA paper, reproduced", "",
        f"Model `{engine.model_path.name}` ({engine.n_layer} blocks), vectors {inputs.source}. "
        f"Generated by `caa-local eval report --paper` in {elapsed:.0f} s. Layers chosen on the validation "
        "split of each behavior's generate_dataset.json; every other number on the paper's held-out "
        "test_dataset_ab.json (n per row). The paper's column: Llama-2-7b-chat at layer 13 of 32.", "",
        "## A/B p(answer matching behavior) at the chosen layer", "",
        *_table(["behavior", "layer", "x-1", "x0", "x+1", "n", "paper x-1", "paper x0", "paper x+1"], headline), "",
        "## System prompts x multipliers (the paper's pos/neg prompts)", "", *sys_lines,
        *extras, *(line for section in sections for line in section),
        "## Files", "", *(f"- `{name}`" for name in files), "",
    ])
    write_text(readme, text.rstrip() + "\n", force)
    return readme


def _open_ended_prompts(behavior: str, limit: int | None) -> list[str]:
    from caa_local.core.datasets import load_open_ended

    return load_open_ended(behavior)[: limit or None]


def _behavior_section(behavior: str, layer: int, val: Any, test: Any, sweep: Any, mults: Any, transfer: Any,
                      scores: Mapping[float, float | None], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [f"## {behavior}", "",
             f"Layer {layer}: largest p(+1) - p(-1) on {val.label()}.", "",
             f"![layer sweep]({behavior}_layers.png) ![multipliers]({behavior}_multipliers.png) "
             f"![transfer]({behavior}_transfer.png)", "",
             f"### Multipliers at layer {layer} ({test.label()})", "",
             *_table(["multiplier", "p(match)", "option mass"],
                     [[f"{r['multiplier']:+g}", f"{r['p_match']:.3f}", f"{r['option_mass']:.3f}"] for r in mults.rows()]),
             "", f"### The layer-{layer} vector at every layer ({test.label()})", "",
             *_table(["layer", "x-1", "x0", "x+1"],
                     [[lay, *(f"{v:.3f}" for v in transfer.p_match[i].mean(axis=-1))]
                      for i, lay in enumerate(transfer.layers)]), ""]
    n_prompts = len({r["prompt"] for r in rows})
    if scores:
        lines += [f"### Open-ended, judged 0-10 with the paper's rubric ({n_prompts} prompts)", "",
                  *_table(["multiplier", "mean score"],
                          [[f"{m:+g}", "n/a" if s is None else f"{s:.2f}"] for m, s in scores.items()]), ""]
    else:
        lines += [f"Open-ended answers ({n_prompts} prompts, greedy, 100 tokens): `{behavior}_open_ended_export.jsonl`, "
                  "with the paper's judge prompt per answer for an external judge (`--judge-model` judges locally).", ""]
    return lines


def _across_behaviors(out: Path, inputs: PaperInputs, config: PaperConfig, chosen: Mapping[str, int],
                      results: dict[str, Any], say: Callable[[str], None], heatmap: Any, lines_vs_layer: Any,
                      layer_similarity: Any, token_bars: Any) -> list[str]:
    """Cosine of behaviors, base vs chat, per-token cosine: the figures across behaviors."""
    import numpy as np

    from caa_local.core.datasets import eval_set
    from caa_local.eval.analyze import behavior_cosines, format_matrix

    lines: list[str] = []
    # The layer most behaviors chose (the paper's 13 of 32 is a 7B model's; never assume a fixed depth).
    counts = list(chosen.values())
    layer = max(sorted(set(counts)), key=counts.count)
    behaviors = list(config.behaviors)
    if len(behaviors) >= 2:
        names, matrix = behavior_cosines({b: inputs.vectors[b] for b in behaviors}, layer)
    else:
        names, matrix = behaviors, np.ones((1, 1))
    heatmap(matrix, names, out / "behaviors.png", f"cosine of behaviors at layer {layer}", force=True)
    results["behavior_cosine"] = {"layer": layer, "names": names, "matrix": np.round(matrix, 4).tolist()}
    lines += [f"## Cosine of the behaviors' vectors at layer {layer}", "", "![behaviors](behaviors.png)", "",
              "```", format_matrix(names, matrix), "```", ""]
    if inputs.base_vectors:
        say("base- vs chat-model vectors")
        series, rows = {}, []
        for b in behaviors:
            if b not in inputs.base_vectors:
                continue
            sim = layer_similarity(inputs.base_vectors[b], inputs.vectors[b], ("base", "chat"))
            series[b] = (sim.layers, sim.cosine)
            from caa_local.eval.ab import ab_sweep

            test = eval_set(b, "test", config.limit)
            moved = ab_sweep(inputs.engine, inputs.base_vectors[b], test.items, [chosen[b]], LAYER_SWEEP, force=True)
            rows.append([b, chosen[b], f"{sim.cosine[sim.layers.index(chosen[b])]:+.2f}" if chosen[b] in sim.layers
                         else "n/a", *(f"{moved.mean(chosen[b], m):.2f}" for m in LAYER_SWEEP)])
            results["behaviors"][b]["base_vs_chat"] = {**sim.to_json(), "transfer_p_match": moved.rows()}
        lines_vs_layer(series, out / "base_vs_chat.png", "cosine(base, chat)", "base- vs chat-model vectors",
                       (-1, 1), force=True)
        lines += ["## Base- vs chat-model vectors", "", "![base vs chat](base_vs_chat.png)", "",
                  "The base model's vector steering the chat model (test set, the chat vector's layer):", "",
                  *_table(["behavior", "layer", "cosine", "x-1", "x0", "x+1"], rows), ""]
    if inputs.hf is not None:
        from caa_local.torch.token_view import token_similarity  # the torch extra: only with a torch model

        model, tokenizer, template = inputs.hf
        lines += ["## Per-token cosine with the vector", ""]
        for b in behaviors:
            item = eval_set(b, "test").items[TOKENS_PROMPT_INDEX]
            tokens = token_similarity(model, tokenizer, template, inputs.vectors[b], chosen[b], item.question,
                                      "(" + item.matching_letter)
            token_bars(tokens.tokens, tokens.cosine, out / f"{b}_tokens.png",
                       f"{b} @ layer {chosen[b]}: cosine per token", tokens.steer_from, force=True)
            results["behaviors"][b]["tokens"] = tokens.to_json()
            lines += [f"![{b} tokens]({b}_tokens.png)", ""]
    return lines


def shipped_results(engine: Engine, vectors_dir: str | Path, limit: int | None = None,
                    progress: Callable[[int], None] | None = None) -> str:
    """Markdown: every vector in ``vectors_dir`` at its recommended layer, p(match) at -1/0/+1.

    Paper behaviors on their held-out test sets, beside the paper's Llama-2-7b-chat numbers;
    demo behaviors on their validation split. This is ``vectors/RESULTS.md``.
    """
    from caa_local.core.datasets import eval_set
    from caa_local.core.vector import ControlVector
    from caa_local.eval.ab import ab_sweep

    rows = []
    for path in sorted(Path(vectors_dir).glob("*.gguf")):
        vector = ControlVector.load(path)
        behavior = vector.metadata.get("behavior") or path.stem
        layer = vector.recommended_layer()
        if layer is None:
            continue
        data = eval_set(behavior, None, limit)
        result = ab_sweep(engine, vector, data.items, [layer], LAYER_SWEEP, progress=progress, force=True)
        paper = [f"{v:.2f}" for v in PAPER_P_MATCH[behavior]] if behavior in PAPER_P_MATCH else ["-"] * 3
        rows.append([path.stem, layer, data.split, data.n, *(f"{result.mean(layer, m):.3f}" for m in LAYER_SWEEP),
                     *paper])
    sets = f"the first {limit} questions of " if limit else ""
    return "\n".join([
        "# Shipped vectors: A/B p(match) at the recommended layer", "",
        f"Generated by `python -m caa_local.eval.paper vectors/RESULTS.md [VECTORS_DIR [LIMIT]]` on "
        f"`{engine.model_path.name}` (the native engine, the paper's position mask). The paper's seven "
        f"behaviors on {sets}their held-out test_dataset_ab.json, the demo behaviors on {sets}the validation "
        "split of their generate_dataset.json; "
        "the last columns are the paper's Llama-2-7b-chat at layer 13 (a 7B model; the default 135M model "
        "does not carry these behaviors, see README.md).", "",
        *_table(["vector", "layer", "split", "n", "x-1", "x0", "x+1", "paper x-1", "paper x0", "paper x+1"], rows), "",
    ])


def results_main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - regenerates vectors/RESULTS.md
    """``python -m caa_local.eval.paper OUT.md [VECTORS_DIR]``."""
    from caa_local.core.locate import shipped_vectors_dir
    from caa_local.engine.engine import Engine

    args = list(sys.argv[1:] if argv is None else argv)
    out = Path(args[0] if args else "vectors/RESULTS.md")
    folder = Path(args[1]) if len(args) > 1 else shipped_vectors_dir()
    limit = int(args[2]) if len(args) > 2 else None
    write_text(out, shipped_results(Engine(n_ctx=1024), folder, limit), force=True)
    print(f"wrote {out}")


if __name__ == "__main__":  # pragma: no cover
    results_main()
