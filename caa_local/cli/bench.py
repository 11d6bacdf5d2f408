"""`caa-local bench`: every speed claim measured side by side in one run."""

from __future__ import annotations

import json
from pathlib import Path

import click

from caa_local.cli import flash_attn_choice, model_options
from caa_local.core.errors import CaaError


@click.command(name="bench")
@model_options
@click.option("json_out", "--json", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result rows as JSON (written atomically).")
@click.option("markdown_out", "--markdown", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the README performance section as Markdown.")
@click.option("from_json", "--from-json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Show (and --markdown) the rows of an earlier --json file; measure nothing.")
@click.option("quick", "--quick", is_flag=True, help="Small sizes and at most 2 runs: a smoke test, not figures.")
@click.option("repeats", "--repeats", "-r", type=click.IntRange(min=1), default=5, show_default=True,
              help="Runs of every measurement (medians are reported).")
@click.option("--force", is_flag=True, help="Overwrite --json / --markdown files that exist.")
def bench(model_path: Path | None, n_ctx: int, n_threads: int, n_gpu_layers: int, json_out: Path | None,
          markdown_out: Path | None, from_json: Path | None, quick: bool, repeats: int, force: bool) -> None:
    """Benchmark decoding, prefill, A/B sweeps, extraction, start-up, steering changes and memory.

    Ratios compare two measured rates from one run, their sides alternated (A B, B A, ...) in
    one process; targets are printed with whether they are met. Each group runs in a fresh
    process, so the peak-RSS figures are that process's own. Use a quiet machine: other
    processes on the same cores distort llama.cpp's threads most.

    \b
    Example:
      caa-local bench --threads 2 --json bench.json --markdown perf.md
      caa-local bench --from-json bench.json --markdown perf.md --force
    """
    from caa_local.core.atomic import check_writable, write_json, write_text
    from caa_local.bench.runner import check_rows, format_table, render_markdown, run
    from caa_local.bench.measure import Config

    if n_gpu_layers:
        raise CaaError("bench measures the CPU path: --gpu-layers is not supported here")
    if flash_attn_choice() != "auto":
        raise CaaError("bench measures llama.cpp's default attention: --flash-attn is not supported here")
    if n_threads < 0:
        raise CaaError(f"--threads must be positive (or 0 for all cores), got {n_threads}")
    for path in (json_out, markdown_out):
        if path is not None:
            check_writable(path, force)
    if from_json is not None:
        try:
            rows = json.loads(from_json.read_text(encoding="utf-8"))
        except ValueError as err:
            raise CaaError(f"{from_json}: not JSON ({err})") from None
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise CaaError(f"{from_json}: expected a list of rows from `caa-local bench --json`")
    else:
        cfg = Config(model=str(model_path) if model_path else None, threads=n_threads, repeats=repeats, n_ctx=n_ctx)
        if quick:
            cfg = cfg.quick()
        rows = run(cfg, echo=lambda text: click.echo(text, err=True))
        # A smoke test's figures must not pass for real ones.
        rows = [{**row, "quick": quick} for row in rows]
    check_rows(rows)
    click.echo(format_table(rows))
    if json_out is not None:
        write_json(json_out, rows, force=force)
        click.echo(f"wrote {json_out}", err=True)
    if markdown_out is not None:
        write_text(markdown_out, render_markdown(rows), force=force)
        click.echo(f"wrote {markdown_out}", err=True)
