"""Calibration: the layer and the strength of a vector on a model, and a reliability card.

1. **Layer.** A/B behaviors (metric ``p_match``): the layer with the largest p(+1) - p(-1) on
   the validation split (``ab_sweep``). Judge-free metrics (the demo behaviors): the A/B sweep
   shortlists ``candidates`` layers, then greedy open-ended answers (``open_ended``) at
   -probe / +probe pick the layer whose metric moves most without degenerate answers.
2. **Strength.** ``caa_local.eval.coherence``: multi-turn conversations on held-out prompts
   with the chat's own sampling, at multiplier 0 and then a search along each side's grid
   (coarse steps, then bisection, on a third of the conversations; the multiplier it lands on
   answers them all; every round's conversations decoded together in one batch, a multiplier
   dropped once its failure is certain) for the first failure of the guard
   (perplexity under the unsteered model, broken turns, repetition). The recommended
   multiplier is the largest positive one that passes; the negative limit the
   largest-magnitude negative one. ``strategy="walk"`` runs the exhaustive walk instead (every
   multiplier outwards until the first failure, one conversation at a time).
3. **Card.** At the recommended setting: p(match) on the test split, the anti-steerable
   fraction, the system-prompt baseline (the paper's pos/neg prompts, no vector) and the
   MMLU change.

Everything lands in a JSON summary that :func:`calibrated` writes into the vector's
metadata (``caa.calibration``, plus ``recommended_layer``, ``recommended_multiplier`` and
``negative_multiplier_limit``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from caa_local.core.errors import CaaError
from caa_local.core.layers import check_vector_layers
from caa_local.core.vector import CALIBRATION_KEYS, ControlVector
from caa_local.eval import metrics as M
from caa_local.eval.coherence import (GENERIC_PROMPTS, JUDGE_FREE, Guard, Log, build_conversations, limits,
                                      strength_curve, strength_walk)

FORMAT_VERSION = 1
STRATEGIES = ("search", "walk")
DEFAULT_MULTIPLIERS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)


@dataclass(frozen=True)
class Settings:
    """What to calibrate and how much data to spend on it."""

    metric: str = "p_match"
    layers: Sequence[int] | None = None         # candidate layers (None: every layer of the vector)
    multipliers: Sequence[float] = (*(-m for m in DEFAULT_MULTIPLIERS), *DEFAULT_MULTIPLIERS)
    val_limit: int = 40                          # A/B validation questions for the layer choice
    candidates: int = 3                          # layers shortlisted for a judge-free metric
    probe: float = 1.0                           # multiplier of the judge-free layer probe
    layer_prompts: int = 8                       # open-ended prompts for that probe
    conversations: int = 12
    turns: int = 3
    max_tokens: int = 96                         # per answer in the guard's conversations
    test_limit: int = 50                         # questions of the card's p(match)
    mmlu_limit: int = 40                         # 0: no MMLU line on the card
    seed: int = 0
    guard: Guard = field(default_factory=Guard)
    strategy: str = "search"                     # or "walk": the exhaustive reference, unbatched

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise CaaError(f"unknown strategy {self.strategy!r}: expected {' or '.join(STRATEGIES)}")
        if self.metric != "p_match" and self.metric not in JUDGE_FREE:
            raise CaaError(f"unknown metric {self.metric!r}: expected p_match or one of {', '.join(JUDGE_FREE)}")
        for name in ("val_limit", "candidates", "layer_prompts", "conversations", "turns", "max_tokens"):
            if getattr(self, name) < 1:
                raise CaaError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not any(m != 0 for m in self.multipliers):
            raise CaaError("calibration needs at least one non-zero multiplier")
        if any(not math.isfinite(m) for m in self.multipliers):
            raise CaaError("multipliers must be finite numbers")


QUICK = dict(val_limit=8, candidates=2, layer_prompts=3, conversations=3, turns=2, max_tokens=40,
             test_limit=12, mmlu_limit=12)


@dataclass(frozen=True)
class Data:
    """The calibration's data: A/B items (optional for judge-free metrics) and prompts."""

    behavior: str
    dataset: str = ""
    dataset_sha256: str = ""
    val: Sequence[Any] = ()
    test: Sequence[Any] = ()
    test_split: str = ""
    prompts: Sequence[str] = GENERIC_PROMPTS
    paper_behavior: bool = False  # the paper's protocol has pos/neg system prompts for it


def load_data(behavior: str, dataset: str | None, settings: Settings) -> Data:
    """A/B validation and test items, open-ended prompts and whether the paper has system prompts."""
    from caa_local.core.datasets import behavior_names, dataset_path, eval_set, has_test_set, load_open_ended

    source = dataset or (behavior if behavior in behavior_names() else None)
    if source is None:
        if settings.metric == "p_match":
            raise CaaError(f"vector behavior {behavior or '(none)'!r} is not a packaged one: pass "
                           "--dataset FILE.json (A/B pairs) or a judge-free --metric")
        return Data(behavior)
    val = eval_set(source, "val", settings.val_limit)
    # The card reports on the paper's held-out test set; elsewhere on the validation split
    # (never "all": a file's training part is what the vector was extracted from).
    test = eval_set(source, "test", settings.test_limit) if has_test_set(source) else \
        eval_set(source, "val", settings.test_limit)
    prompts: Sequence[str] = GENERIC_PROMPTS
    if source in behavior_names() and dataset_path(source, "open_ended").is_file():
        prompts = load_open_ended(source)
    return Data(behavior or val.name, val.name, val.sha256, val.items, test.items, test.split, prompts,
                has_test_set(source))


def split_prompts(prompts: Sequence[str], settings: Settings) -> tuple[list[str], list[list[str]]]:
    """Prompts for the layer probe, and the conversations' user turns (held out from the probe)."""
    pool = list(prompts)
    n_probe = min(settings.layer_prompts, max(len(pool) // 4, 1)) if settings.metric in JUDGE_FREE else 0
    probe, rest = pool[:n_probe], pool[n_probe:] or pool
    return probe, build_conversations(rest, settings.conversations, settings.turns)


# -- layer choice -----------------------------------------------------------------------------
def ab_layer_effects(engine: Any, vector: ControlVector, items: Sequence[Any], layers: Sequence[int],
                     any_arch: bool = False) -> dict[int, float]:
    """Per layer: p(match) at +1 minus at -1 on ``items``."""
    from caa_local.eval.ab import ab_sweep

    sweep = ab_sweep(engine, vector, items, layers, [-1.0, 0.0, 1.0], None, None, any_arch)
    return {layer: sweep.mean(layer, 1.0) - sweep.mean(layer, -1.0) for layer in sweep.layers}


def metric_layer_effects(engine: Any, vector: ControlVector, layers: Sequence[int], prompts: Sequence[str],
                         settings: Settings, any_arch: bool = False) -> dict[int, float]:
    """Per layer: metric(+probe) - metric(-probe) of greedy answers (-inf where answers degenerate)."""
    from caa_local.eval.open_ended import open_ended

    out = {}
    rows = open_ended(engine, vector, layers, [-settings.probe, settings.probe], list(prompts),
                      max_tokens=settings.max_tokens, seed=settings.seed, force=any_arch,
                      batched=settings.strategy == "search")
    for layer in layers:
        side = {m: [r["answer"] for r in rows if r["layer"] == layer and r["multiplier"] == m]
                for m in (-settings.probe, settings.probe)}
        if any(np.mean([M.degenerate(a) for a in answers]) > 0.2 for answers in side.values()):
            out[layer] = -math.inf
            continue
        mean = {m: float(np.mean([M.METRICS[settings.metric](a) for a in answers])) for m, answers in side.items()}
        out[layer] = mean[settings.probe] - mean[-settings.probe]
    return out


def choose_layer(engine: Any, vector: ControlVector, data: Data, probe_prompts: Sequence[str],
                 settings: Settings, log: Log, any_arch: bool = False) -> tuple[int, dict[str, Any]]:
    """The layer, and how it was chosen (method, n, per-layer scores)."""
    candidates = check_vector_layers(settings.layers or vector.layers, vector.layers, engine.n_layer)
    if len(candidates) == 1:
        return candidates[0], {"method": "given", "scores": {}}
    ab: dict[int, float] = {}
    if data.val:
        log(f"layer sweep: p(match) at -1/+1 on {len(data.val)} validation questions x {len(candidates)} layers")
        ab = ab_layer_effects(engine, vector, data.val, candidates, any_arch)
    if settings.metric == "p_match":
        best = max(ab, key=lambda layer: ab[layer])
        return best, {"method": "ab-validation", "n": len(data.val), "scores": _rounded(ab)}
    shortlist = sorted(ab, key=lambda layer: ab[layer], reverse=True)[: settings.candidates] if ab else candidates
    log(f"layer probe: {settings.metric} at {-settings.probe:+g}/{settings.probe:+g} on {len(probe_prompts)} "
        f"prompts x layers {', '.join(map(str, shortlist))}")
    effects = metric_layer_effects(engine, vector, shortlist, probe_prompts, settings, any_arch)
    best = max(effects, key=lambda layer: effects[layer])
    return best, {"method": f"{settings.metric}-probe", "n": len(probe_prompts), "ab_n": len(data.val),
                  "ab_scores": _rounded(ab), "scores": _rounded(effects)}


def _rounded(scores: dict[int, float]) -> dict[str, float | None]:
    return {str(k): (round(v, 4) if math.isfinite(v) else None) for k, v in scores.items()}


# -- the reliability card ---------------------------------------------------------------------
def reliability_card(engine: Any, vector: ControlVector, layer: int, multiplier: float, negative: float | None,
                     data: Data, settings: Settings, log: Log, any_arch: bool = False) -> dict[str, Any]:
    """p(match) on the test split, anti-steerable share, system-prompt baseline, MMLU change."""
    from caa_local.eval.ab import ab_sweep
    from caa_local.eval.capability import capability_eval

    card: dict[str, Any] = {"layer": layer, "multiplier": multiplier, "negative_limit": negative}
    if data.test:
        mults = sorted({0.0, multiplier, *([negative] if negative is not None else [])})
        log(f"card: p(match) on {len(data.test)} {data.test_split} questions at x{', x'.join(f'{m:+g}' for m in mults)}")
        sweep = ab_sweep(engine, vector, data.test, [layer], mults, None, None, any_arch)
        ld = sweep.logit_diff[0]
        moved = (ld[mults.index(multiplier)] - ld[mults.index(0.0)]) * np.sign(multiplier)
        card["p_match"] = {"split": data.test_split, "n": sweep.n, "at_0": round(sweep.mean(layer, 0.0), 4),
                           "at_recommended": round(sweep.mean(layer, multiplier), 4),
                           "at_negative_limit": round(sweep.mean(layer, negative), 4) if negative is not None else None}
        card["anti_steerable"] = round(float((moved < 0).mean()), 4)
    card["system_prompt"] = system_prompt_baseline(engine, data, log)
    if settings.mmlu_limit:
        log(f"card: MMLU, {settings.mmlu_limit} questions at x+0 and x{multiplier:+g}")
        mmlu = capability_eval(engine, "mmlu", vector, layer, [0.0, multiplier], limit=settings.mmlu_limit)
        base, steered = mmlu.at(0.0), mmlu.at(multiplier)
        card["mmlu"] = {"n": mmlu.n, "at_0": round(base, 4), "at_recommended": round(steered, 4),
                        "change": round(steered - base, 4)}
    return card


def system_prompt_baseline(engine: Any, data: Data, log: Log) -> dict[str, Any] | None:
    """p(match) with no, the paper's pos and its neg system prompt, no vector (None: the protocol has none)."""
    from caa_local.eval.system_prompts import system_prompt_baseline as baseline

    if not data.paper_behavior or not data.test:
        return None
    log(f"card: system-prompt baseline on {len(data.test)} questions")
    return {"n": len(data.test), **{k: round(v, 4) for k, v in baseline(engine, data.dataset, data.test).items()}}


def card_lines(summary: dict[str, Any]) -> list[str]:
    """The card as text, for the terminal."""
    card, metric = summary["card"], summary["metric"]
    rec = {p["multiplier"]: p for p in summary["curve"]}
    base, top = rec[0.0], rec[summary["recommended_multiplier"]]
    neg = summary["negative_limit"]
    lines = [f"{summary['behavior'] or 'vector'} on {summary['model']}: layer {summary['layer']} "
             f"({summary['layer_choice']['method']}), multiplier x{summary['recommended_multiplier']:+g}"
             + (f", negative limit x{neg:+g}" if neg is not None else ", no negative multiplier passed")]
    if "metric" in base and "metric" in top:
        lines.append(f"  {metric}: {base['metric']:.3f} at x+0 -> {top['metric']:.3f} at x{top['multiplier']:+g}"
                     + (f", {rec[neg]['metric']:.3f} at x{neg:+g}" if neg is not None and "metric" in rec[neg] else ""))
    lines.append(f"  guard ({summary['n']} turns in {summary['conversations']} conversations, chat sampling): "
                 f"perplexity x{top['perplexity_ratio']:.2f}, broken turns {top['broken']:.0%} (x+0: {base['broken']:.0%})")
    if "p_match" in card:
        p = card["p_match"]
        lines.append(f"  p(match) on {p['n']} {p['split']} questions: {p['at_0']:.3f} at x+0 -> {p['at_recommended']:.3f}"
                     + (f", {p['at_negative_limit']:.3f} at x{neg:+g}" if p["at_negative_limit"] is not None else "")
                     + f"; anti-steerable {card['anti_steerable']:.0%}")
    if card.get("system_prompt"):
        s = card["system_prompt"]
        lines.append(f"  system-prompt baseline (no vector): none {s['none']:.3f}, pos {s['pos']:.3f}, neg {s['neg']:.3f}")
    if card.get("mmlu"):
        m = card["mmlu"]
        lines.append(f"  MMLU ({m['n']} questions): {m['at_0']:.3f} -> {m['at_recommended']:.3f} ({m['change']:+.3f})")
    return lines


# -- the whole calibration --------------------------------------------------------------------
def calibrate(engine: Any, vector: ControlVector, data: Data, settings: Settings = Settings(),
              log: Log | None = None, any_arch: bool = False) -> dict[str, Any]:
    """Layer, strength and card; returns the summary that :func:`calibrated` stores."""
    from caa_local.engine.engine import CHAT_SAMPLING
    from caa_local.core.locate import file_sha256

    log = log or (lambda message: None)
    start = time.perf_counter()
    engine.make_term("calibrate", vector, 1.0, None, any_arch)  # refuses a vector that does not fit
    probe_prompts, conversations = split_prompts(data.prompts, settings)
    layer, layer_choice = choose_layer(engine, vector, data, probe_prompts, settings, log, any_arch)
    log(f"layer {layer}; strength: {len(conversations)} conversations x {settings.turns} turns per multiplier")
    sampling = dataclasses.replace(CHAT_SAMPLING, max_tokens=settings.max_tokens)
    find = strength_curve if settings.strategy == "search" else strength_walk
    curve = find(engine, vector, layer, conversations, settings.multipliers, settings.guard,
                 settings.metric, sampling, settings.seed, log)
    if data.val and settings.metric == "p_match":
        from caa_local.eval.ab import ab_sweep

        mults = [p["multiplier"] for p in curve]
        sweep = ab_sweep(engine, vector, data.val, [layer], mults, None, None, any_arch)
        for point in curve:
            point["p_match"] = point["metric"] = round(sweep.mean(layer, point["multiplier"]), 4)
    positive, negative = limits(curve)
    if positive is None:
        first = min((p for p in curve if p["multiplier"] > 0), key=lambda p: p["multiplier"], default=None)
        raise CaaError(f"no positive multiplier passed the guard at layer {layer}"
                       + (f" (x{first['multiplier']:+g}: {'; '.join(first['failures'])})" if first else "")
                       + ": try smaller --multipliers, e.g. 0.1,0.2,0.3")
    card = reliability_card(engine, vector, layer, positive, negative, data, settings, log, any_arch)
    return {
        "version": FORMAT_VERSION, "behavior": data.behavior, "dataset": data.dataset,
        "dataset_sha256": data.dataset_sha256, "model": engine.model_path.name,
        "model_sha256": file_sha256(engine.model_path), "metric": settings.metric,
        "layer": layer, "layer_choice": layer_choice,
        "recommended_multiplier": positive, "positive_limit": positive, "negative_limit": negative,
        "guard": dataclasses.asdict(settings.guard),
        "sampling": {k: v for k, v in dataclasses.asdict(sampling).items() if k != "seed"},
        "conversations": len(conversations), "turns": settings.turns,
        "n": sum(len(c) for c in conversations), "seed": settings.seed,
        "curve": curve, "card": card, "seconds": round(time.perf_counter() - start, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def calibrated(vector: ControlVector, summary: dict[str, Any]) -> ControlVector:
    """``vector`` with the calibration in its metadata (replacing an earlier one)."""
    import json

    meta = {k: v for k, v in vector.metadata.items() if k not in CALIBRATION_KEYS}
    meta.update(recommended_layer=str(summary["layer"]),
                recommended_multiplier=f"{summary['recommended_multiplier']:g}",
                calibration=json.dumps(summary, separators=(",", ":"), ensure_ascii=False))
    if summary["negative_limit"] is not None:
        meta["negative_multiplier_limit"] = f"{summary['negative_limit']:g}"
    return ControlVector(vector.model_hint, vector.directions, meta)
