"""Shared fixtures: the default model, loaded once per test session (llama.cpp: ``model``, each
test module opening its own context on it; transformers: ``hf_model``).

Modules whose tests load the model, start the server or a browser, or spawn the CLI say so with
``pytestmark = pytest.mark.slow``; `make test-fast` runs everything else. Markers are declared in
pyproject.toml.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Any

import pytest

from caa_local.cli import main

# Debian's Chromium, which the page tests drive through Playwright (never a downloaded browser).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium chromium-driver)")

# Started as a background job, this process (and every child it spawns) inherits an ignored
# SIGINT, and the children's Ctrl-C tests would hang. A handler of our own is reset to the
# default in every child at exec, so the suite behaves the same however it was launched.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def model() -> Any:
    """The default GGUF model, loaded once; a module opens a context with ``model.context(...)``."""
    from caa_local import Model

    return Model()


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
