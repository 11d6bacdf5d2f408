"""One rule for a GGUF without a chat template, everywhere: refused with --chat-template offered,
never chatted with in a guessed format (an old Llama-2 conversion would get ChatML)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from caa_local import Engine, Model
from caa_local.core.templates import CHATML, LLAMA2, TemplateError, user_turn
from conftest import one_error, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bare(model: Model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with its tokenizer.chat_template removed."""
    out = tmp_path_factory.mktemp("bare") / "bare.gguf"
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", "--force", "--remove-metadata",
                    "tokenizer.chat_template", str(model.path), str(out)], check=True, capture_output=True)
    return out


def test_the_api_refuses_until_a_template_is_chosen(bare: Path) -> None:
    engine = Engine(bare, n_ctx=256, n_threads=1)
    with pytest.raises(TemplateError, match=r"bare.gguf: has no chat template .*--chat-template"):
        engine.prompt(user_turn("Hi"))
    with pytest.raises(TemplateError, match="has no chat template"):
        engine.model.template  # noqa: B018 - the property raises
    assert engine.use_template("llama2").source == LLAMA2
    tokens, steer_from = engine.prompt(user_turn("Hi"))
    assert "[/INST]" in engine.detokenize(tokens, special=True) and 0 < steer_from < len(tokens)
    assert engine.new_context(n_ctx=128).template.source == LLAMA2  # a new context keeps the choice


def test_a_context_can_choose_another_template_than_the_gguf(model: Model) -> None:
    engine = model.context(n_ctx=256, n_threads=1)
    own = engine.template.source
    assert own == model.template.source and own != CHATML
    engine.use_template("chatml")
    assert engine.template.source == CHATML and model.template.source == own  # the model keeps its own


@pytest.mark.parametrize("args", [
    ("generate", "Hi", "--max-tokens", "2"),
    ("eval", "ab", "--vector", "sentiment", "--limit", "1", "--layers", "20"),
    ("calibrate", "sentiment", "--quick", "--out", "{tmp}/c.gguf"),
    ("extract", "sentiment", "--limit", "2", "--out", "{tmp}/e.gguf"),
])
def test_every_command_refuses_and_offers_the_option(capsys: pytest.CaptureFixture[str], bare: Path,
                                                     tmp_path: Path, args: tuple[str, ...]) -> None:
    argv = [a.format(tmp=tmp_path) for a in args]
    code, _, err = run_cli(capsys, *argv, "--model", str(bare), "--threads", "1")
    line = one_error(code, err)
    assert "has no chat template" in line and "--chat-template" in line
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_the_option_makes_it_work(capsys: pytest.CaptureFixture[str], bare: Path) -> None:
    code, out, err = run_cli(capsys, "generate", "Hi", "--model", str(bare), "--chat-template", "chatml",
                             "--max-tokens", "2", "--threads", "1", "--temperature", "0")
    assert code == 0, err
