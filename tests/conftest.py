"""Shared fixtures: the default model, loaded once per test session through load_hf."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from caa_local.cli import main


# Modules whose tests load the model, start the server or a browser, or spawn the CLI: `slow`.
# `make test-fast` runs everything else (file formats, layers, datasets, templates, contracts).
SLOW_MODULES = frozenset({
    "test_batch", "test_bench", "test_calibrate", "test_chat", "test_cli_errors", "test_cli_eval", "test_engine",
    "test_evaluate", "test_extract", "test_extract_native", "test_interrupts", "test_metrics",
    "test_native", "test_page", "test_paper", "test_parity", "test_serve", "test_serve_batching",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__ in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "torch: needs torch and loads the default model with transformers"
    )


@pytest.fixture(scope="session")
def hf_model() -> tuple[Any, Any, Any]:
    """(model, tokenizer, template) of the default GGUF model, via the conversion cache."""
    from caa_local.torch.hf import chat_template_of, load_hf

    model, tokenizer, _info = load_hf(None)
    return model, tokenizer, chat_template_of(tokenizer)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `caa-local ARGS` in-process: (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error(code: int, err: str) -> str:
    """The single `Error: ...` line of a failed command (exit 1, no traceback)."""
    assert code == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def is_png(path: Path) -> bool:
    from caa_local.eval.plots import PNG_MAGIC

    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def write_raw_vector(path: Path, tensors: dict[str, Any], *, arch: str = "controlvector",
                     hint: str | None = "llama", layer_count: int | None = None,
                     layer_count_type: str = "uint32", endianess: Any = None) -> Path:
    """A vector file written with gguf.GGUFWriter directly (as repeng writes them), bypassing
    ControlVector's validation, so tests can hand hostile files to the reader and the CLI."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch, endianess=endianess or gguf.GGUFEndian.LITTLE)
    if hint is not None:
        writer.add_string("controlvector.model_hint", hint)
    count = len(tensors) if layer_count is None else layer_count
    getattr(writer, f"add_{layer_count_type}")("controlvector.layer_count", count)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_vector(n_embd: int, layers: range | list[int], norm: float, seed: int = 0) -> Any:
    """A seeded random ControlVector with unit-norm directions scaled to ``norm`` on ``layers``."""
    import numpy as np

    from caa_local.core.vector import ControlVector

    rng = np.random.default_rng(seed)
    directions = {}
    for layer in layers:
        v = rng.standard_normal(n_embd)
        directions[layer] = (v / np.linalg.norm(v) * norm).astype(np.float32)
    return ControlVector("llama", directions, {"behavior": "random"})
