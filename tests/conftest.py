"""Shared fixtures: the default model, loaded once per test session through load_hf."""

from __future__ import annotations

from typing import Any

import pytest


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
