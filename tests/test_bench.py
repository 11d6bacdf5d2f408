"""`caa-local bench`: the JSON contract, targets, table and README section (not the speed).

One test runs the real `--quick` benchmark (about a minute and a half on 2 busy cores with
one thread); the others build rows from made-up figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from caa_local.bench.runner import REQUIRED, build_rows, check_rows, format_table, render_markdown
from caa_local.core.errors import CaaError
from conftest import run_cli

pytestmark = pytest.mark.slow

RATIO_ROWS = ("decode_steered_vs_unsteered", "decode_native_vs_llama_cpp_python", "decode_native_vs_llama_cpp",
              "decode_native_vs_transformers", "prefill_native_vs_llama_cpp_python", "ab_sweep_reuse_vs_naive",
              "extract_batched_vs_loop", "extract_native_vs_torch",
              "serve_decode_vs_engine", "serve_concurrent_vs_serial", "condition_prefill_overhead",
              "decode_rpc_local_vs_cpu", "batch_vs_llama_cpp_batched", "batch_steering_overhead",
              "llama_cpp_batched_vs_single",
              "serve_batch_mixed_vs_serial", "calibrate_vs_before")
VALUE_ROWS = ("chat_startup_s", "steer_change_ms", "peak_rss_generate_mib", "peak_rss_extract_mib",
              "peak_rss_extract_native_mib", "serve_first_token_ms")
WHERE = {"cpu": "Test CPU 9000", "cores": 2, "threads": 2}
FACTS = {"rss_budget_mib": 190.0, "n_ctx": 4096, "gguf_mib": 20.0, "kv_cache_mib": 20.0,
         "rss_extract_native_budget_mib": 300.0, "extract_kv_mib": 50.0}


def made_up_rows() -> list[dict[str, object]]:
    figures = {name: {"value": [2.0, 3.0, 4.0], "baseline": [1.0, 1.0, 1.0]} for name in RATIO_ROWS}
    figures.update({name: {"value": [1.0, 1.2, 2.0]} for name in VALUE_ROWS})
    figures["decode_native_vs_llama_cpp_python"] = {"value": [90.0, 100.0, 110.0], "baseline": [100.0, 80.0, 100.0]}
    figures["peak_rss_generate_mib"] = {"value": [200.0]}
    return build_rows(figures, FACTS, WHERE)


def test_rows_carry_medians_ratios_ranges_and_targets() -> None:
    rows = {row["name"]: row for row in made_up_rows()}
    assert set(REQUIRED) <= set(rows) and set(RATIO_ROWS + VALUE_ROWS) == set(REQUIRED)
    decode = rows["decode_native_vs_llama_cpp_python"]
    assert (decode["value"], decode["baseline"], decode["ratio"], decode["unit"]) == (100.0, 100.0, 1.0, "tok/s")
    assert (decode["min"], decode["max"], decode["runs"]) == (0.9, 1.25, 3)  # per-run ratios
    assert decode["target"] == 1.03 and decode["met"] is False
    assert rows["extract_batched_vs_loop"]["ratio"] == 3.0 and rows["extract_batched_vs_loop"]["met"] is True
    startup = rows["chat_startup_s"]
    assert (startup["value"], startup["baseline"], startup["ratio"]) == (1.2, None, None)
    assert (startup["min"], startup["max"], startup["met"]) == (1.0, 2.0, True)
    rss = rows["peak_rss_generate_mib"]
    assert rss["target"] == 190.0 and rss["met"] is False and "GGUF 20 MiB" in rss["note"]
    assert rows["peak_rss_extract_mib"]["met"] is None
    native_rss = rows["peak_rss_extract_native_mib"]  # at most the budget and a third of torch's peak
    assert native_rss["target"] == pytest.approx(1.2 / 3) and native_rss["met"] is False
    assert all(row["cpu"] == "Test CPU 9000" and row["threads"] == 2 for row in rows.values())


def test_table_and_markdown_name_the_machine_and_targets() -> None:
    rows = made_up_rows()
    table = format_table(rows)
    assert "decode_native_vs_llama_cpp_python" in table and "NOT met" in table and ">= 6.5x" in table
    assert "Test CPU 9000 (2 cores, 2 threads); medians of 3 runs" in table
    markdown = render_markdown(rows)
    assert markdown.startswith("## Performance\n")
    assert "Test CPU 9000 (2 cores, 2 threads)" in markdown
    assert "| `decode_native_vs_llama_cpp_python` [2] | 100 tok/s | 100 tok/s | 1.00x (0.90-1.25) | >= 1.03x | NOT met |" \
        in markdown
    assert "| `chat_startup_s` [" in markdown and "| <= 1.5 s | met |" in markdown
    assert "extract_loop (one forward pass per prompt" in markdown


def test_check_rows_rejects_missing_and_bad_figures() -> None:
    rows = made_up_rows()
    check_rows(rows)
    with pytest.raises(CaaError, match="missing rows extract_batched_vs_loop"):
        check_rows([row for row in rows if row["name"] != "extract_batched_vs_loop"])
    rows[0] = {**rows[0], "ratio": math.nan}
    with pytest.raises(CaaError, match="decode_steered_vs_unsteered.ratio is nan"):
        check_rows(rows)


def test_bench_refuses_to_overwrite_before_measuring(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    out.write_text("[]\n")
    code, _, err = run_cli(capsys, "bench", "--quick", "--json", str(out))
    assert code == 1 and "Traceback" not in err
    # The error is all it printed: no benchmark group started.
    assert err.strip() == f"Error: {out}: file exists (use --force to overwrite)"
    assert out.read_text() == "[]\n"


def test_markdown_from_an_earlier_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved, markdown = tmp_path / "bench.json", tmp_path / "perf.md"
    saved.write_text(json.dumps(made_up_rows()))
    code, out, _ = run_cli(capsys, "bench", "--from-json", str(saved), "--markdown", str(markdown))
    assert code == 0 and "ab_sweep_reuse_vs_naive" in out
    assert markdown.read_text() == render_markdown(made_up_rows())
    saved.write_text('{"not": "rows"}')
    code, _, err = run_cli(capsys, "bench", "--from-json", str(saved))
    assert code == 1 and err.strip().endswith("expected a list of rows from `caa-local bench --json`")


@pytest.mark.torch
def test_quick_bench_writes_the_json_contract(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, markdown = tmp_path / "bench.json", tmp_path / "perf.md"
    code, table, err = run_cli(capsys, "bench", "--quick", "--threads", "1", "--json", str(out),
                           "--markdown", str(markdown))
    assert code == 0, err
    rows = json.loads(out.read_text())
    assert isinstance(rows, list)
    by_name = {row["name"]: row for row in rows}
    assert set(REQUIRED) <= set(by_name)
    for row in rows:
        assert {"name", "value", "unit", "baseline", "ratio", "min", "max", "runs"} <= set(row)
        assert row["quick"] is True and row["threads"] == 1
        figures = [row["value"], row["min"], row["max"]]
        if row["name"] in VALUE_ROWS:
            assert row["baseline"] is None and row["ratio"] is None
        else:
            figures += [row["baseline"], row["ratio"]]
            assert row["ratio"] == pytest.approx(row["value"] / row["baseline"])
        assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in figures), row
        assert row["name"] in table
    assert markdown.read_text().startswith("## Performance")
