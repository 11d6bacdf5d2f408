"""Shared fixtures: the default model, loaded once per test session through load_hf."""

from __future__ import annotations

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
    from caa_local.hf import chat_template_of, load_hf

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
