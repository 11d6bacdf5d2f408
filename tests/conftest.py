"""Shared fixtures: the default model, loaded once per test session through load_hf."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from caa_local.cli import main


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
