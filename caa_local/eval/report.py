"""A Markdown report of every shipped vector, as in the paper: layer sweep, then multipliers.

For each ``vectors/*.gguf``: an A/B sweep over every layer the vector holds at -1, 0, +1
(the paper's layer sweep), then at the recommended layer (the vector's metadata, else the
layer with the largest p(+1) - p(-1)) over -2..2. Writes ``README.md`` with the tables, one
JSON of results and two PNGs per vector, every file atomically.

    python -c "from caa_local.eval.report import make_report; make_report('report', 'vectors')"
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from caa_local.core.atomic import check_writable, write_json, write_text
from caa_local.core.errors import CaaError

if TYPE_CHECKING:
    from caa_local.engine.engine import Engine
    from caa_local.eval.ab import SweepResult

LAYER_SWEEP = (-1.0, 0.0, 1.0)
MULTIPLIER_SWEEP = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def best_layer(result: SweepResult) -> int:
    """The layer where steering moves p(match) most: max p(+1) - p(-1)."""
    hi, lo = result.multipliers.index(max(result.multipliers)), result.multipliers.index(min(result.multipliers))
    effect = result.p_match[:, hi].mean(axis=-1) - result.p_match[:, lo].mean(axis=-1)
    return result.layers[int(effect.argmax())]


def _layer_table(result: SweepResult) -> list[str]:
    slopes = result.steerability()
    lines = ["| layer | p(match) -1 | 0 | +1 | steerability |", "|---|---|---|---|---|"]
    for i, layer in enumerate(result.layers):
        p = result.p_match[i].mean(axis=-1)
        lines.append(f"| {layer} | " + " | ".join(f"{v:.2f}" for v in p) + f" | {_fmt(slopes[layer], '+.2f')} |")
    return lines


def _multiplier_table(result: SweepResult) -> list[str]:
    anti = result.anti_steerable()[result.layers[0]]
    lines = ["| multiplier | p(match) | option mass | logit diff |", "|---|---|---|---|"]
    for row in result.rows():
        lines.append(f"| {row['multiplier']:+g} | {row['p_match']:.3f} | {row['option_mass']:.3f} | "
                     f"{row['logit_diff']:+.3f} |")
    lines.append("")
    lines.append(f"Steerability {_fmt(result.steerability()[result.layers[0]], '+.3f')} nats per unit "
                 f"multiplier; anti-steerable questions {_fmt(anti)}.")
    return lines


def make_report(
    out_dir: str | Path,
    vectors_dir: str | Path,
    split: str | None = None,
    limit: int | None = None,
    engine: Engine | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Evaluate every vector in ``vectors_dir``; returns the path of the README written."""
    from caa_local.core.datasets import eval_set
    from caa_local.eval.ab import ab_sweep
    from caa_local.eval.plots import p_match_vs_layer, p_match_vs_multiplier
    from caa_local.core.vector import ControlVector

    out_dir, vectors_dir = Path(out_dir), Path(vectors_dir)
    # Condition vectors (caa.kind = condition) gate steering; they steer nothing themselves.
    paths = [p for p in sorted(vectors_dir.glob("*.gguf")) if ControlVector.load(p).kind != "condition"]
    if not paths:
        raise CaaError(f"{vectors_dir}: no .gguf vectors to report on")
    readme = out_dir / "README.md"
    check_writable(readme, force)
    if engine is None:
        from caa_local.engine.engine import Engine

        engine = Engine()
    headline = ["| vector | dataset | layer | -1 | 0 | +1 | n |", "|---|---|---|---|---|---|---|"]
    sections: list[str] = []
    started = time.perf_counter()
    for path in paths:
        vector = ControlVector.load(path)
        behavior = vector.metadata.get("behavior") or path.stem
        try:
            data = eval_set(behavior, split, limit)
        except CaaError as err:
            sections += [f"## {path.stem}", "", f"Skipped: {err}", ""]
            continue
        items = data.items
        layers = [layer for layer in vector.layers if layer < engine.n_layer]
        _log(progress, f"{path.name}: layer sweep over {len(layers)} layers, {len(items)} questions")
        sweep = ab_sweep(engine, vector, items, layers, LAYER_SWEEP, force=True)
        layer = vector.recommended_layer()
        chosen_by = "recommended in the vector's metadata"
        if layer is None or layer not in layers:
            layer, chosen_by = best_layer(sweep), "largest p(+1) - p(-1) in the layer sweep"
        _log(progress, f"{path.name}: multipliers at layer {layer}")
        mults = ab_sweep(engine, vector, items, [layer], MULTIPLIER_SWEEP, force=True)
        for result in (sweep, mults):
            result.info.update(model=engine.model_path.name, vector=str(path), **data.describe())
        stem = path.stem
        write_json(out_dir / f"{stem}.json", {"layer_sweep": sweep.to_json(), "multiplier_sweep": mults.to_json()},
                   force=True)
        p_match_vs_layer(sweep, out_dir / f"{stem}_layers.png", force=True)
        p_match_vs_multiplier(mults, out_dir / f"{stem}_multipliers.png", force=True)
        p = [mults.mean(layer, m) for m in LAYER_SWEEP]
        headline.append(f"| {stem} | {data.name} ({data.split}) | {layer} | " + " | ".join(f"{v:.2f}" for v in p)
                        + f" | {mults.n} |")
        sections += [
            f"## {stem}", "",
            f"Behavior `{behavior}`, {mults.n} {data.split} questions; layer {layer} ({chosen_by}).", "",
            f"![layer sweep]({stem}_layers.png) ![multipliers]({stem}_multipliers.png)", "",
            "### Layer sweep", "", *_layer_table(sweep), "",
            f"### Multipliers at layer {layer}", "", *_multiplier_table(mults), "",
        ]
    text = "\n".join([
        "# CAA evaluation report", "",
        f"Model `{engine.model_path.name}`, positions `response`, A/B p(answer matching behavior) "
        f"as in Rimsky et al. (2024). Generated in {time.perf_counter() - started:.0f} s.", "",
        "## Summary", "", *headline, "", *sections,
    ])
    write_text(readme, text.rstrip() + "\n", force)
    return readme


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, file=sys.stderr, flush=True)


def report_main(argv: Sequence[str] | None = None) -> Any:  # pragma: no cover - Makefile helper
    """``python -m caa_local.eval.report OUT_DIR VECTORS_DIR [LIMIT]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = args[0] if args else "report"
    vectors = args[1] if len(args) > 1 else "vectors"
    limit = int(args[2]) if len(args) > 2 else None
    return make_report(out, vectors, limit=limit, force=True)


if __name__ == "__main__":  # pragma: no cover
    report_main()
