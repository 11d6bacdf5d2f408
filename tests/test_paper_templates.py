"""Prompt formats as a rule read from the template: the text between the prompt and ``(A``,
the base format, and no silent ChatML fallback. Real template strings, no download."""

from __future__ import annotations

from pathlib import Path

import pytest

from caa_local.core.templates import (
    BASE, CHATML, LLAMA2, ChatTemplate, TemplateError, instruction_end, resolve_template, shared_prefix, user_turn,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
# mistralai/Mistral-7B-Instruct-v0.2 tokenizer_config.json
MISTRAL_V02 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def fixture(name: str) -> str:
    return (FIXTURES / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


# family -> (template source, the exact end of the rendered prompt + "(A")
FAMILIES = {
    "llama-2": (LLAMA2, "<s>[INST] Is it so? [/INST] (A"),
    "llama-3": (fixture("meta-llama-Llama-3.1-8B-Instruct"),
                "<|start_header_id|>user<|end_header_id|>\n\nIs it so?<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n(A"),
    "mistral-v0.2": (MISTRAL_V02, "<s>[INST] Is it so? [/INST](A"),
    "mistral-nemo": (fixture("mistralai-Mistral-Nemo-Instruct-2407"), "<s>[INST]Is it so?[/INST](A"),
    "gemma-2": (fixture("google-gemma-2-2b-it"), "<s><start_of_turn>user\nIs it so?<end_of_turn>\n<start_of_turn>model\n(A"),
    "qwen-2.5": (fixture("Qwen-Qwen2.5-7B-Instruct"), "<|im_start|>user\nIs it so?<|im_end|>\n<|im_start|>assistant\n(A"),
    "chatml": (CHATML, "<|im_start|>user\nIs it so?<|im_end|>\n<|im_start|>assistant\n(A"),
    "base": (BASE, "<s>Input: Is it so?\nResponse: (A"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_answer_follows_the_template(family: str) -> None:
    source, expected_end = FAMILIES[family]
    template = ChatTemplate(source, "<s>", "</s>")
    messages = user_turn("Is it so?")
    prompt = template.render(messages)
    text = template.render_answer(messages, "(A")
    assert text.endswith(expected_end)
    assert text.startswith(prompt)  # the prompt the model generates from is untouched
    assert template.render_answer(messages, "") == prompt


def test_llama2_separator_with_system_prompt() -> None:
    template = ChatTemplate(LLAMA2, "<s>", "</s>")
    text = template.render_answer(user_turn("Q?", "Be brief."), "(B")
    assert text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQ? [/INST] (B"


def test_templates_that_cannot_render_an_answer_keep_the_plain_prompt() -> None:
    # A template with no assistant branch renders nothing for the answer: no separator is invented.
    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}")
    assert template.render_answer(user_turn("Q"), "(A") == "Q>(A"


def test_no_silent_chatml_fallback(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match=r"m.gguf: has no chat template .*--chat-template FILE\|NAME.*base: the paper"):
        resolve_template("", where="m.gguf")
    assert resolve_template("", "llama2").source == LLAMA2
    assert resolve_template("{{ x }}", fmt="base").source == BASE
    assert resolve_template(CHATML).source == CHATML
    path = tmp_path / "t.jinja"
    path.write_text(MISTRAL_V02, encoding="utf-8")
    assert resolve_template(None, str(path)).source == MISTRAL_V02
    with pytest.raises(TemplateError, match="'nope': not a file nor a known name"):
        resolve_template(CHATML, "nope")
    (tmp_path / "bad.jinja").write_text("{% if %}", encoding="utf-8")
    with pytest.raises(TemplateError, match="does not compile"):
        resolve_template(None, str(tmp_path / "bad.jinja"))
    with pytest.raises(TemplateError, match="--format 'raw'"):
        resolve_template(CHATML, fmt="raw")


@pytest.fixture(scope="module")
def llama2_vocab():  # noqa: ANN201 - llama_cpp.Llama
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(FIXTURES / "ggml-vocab-llama-spm.gguf"), vocab_only=True, verbose=False)


def test_llama2_tokens_read_and_scored(llama2_vocab) -> None:  # noqa: ANN001
    """The paper's Llama-2 prompt: steering from ']' of [/INST]; scored '▁(' 'A'; read at 'A'."""
    template = ChatTemplate(LLAMA2, "<s>", "</s>")

    def tokens(text: str) -> list[int]:
        return llama2_vocab.tokenize(text.encode(), add_bos=False, special=True)

    def piece(token: int) -> str:
        return llama2_vocab._model.token_get_text(token)

    messages = user_turn("Do you agree?\n\nChoices:\n (A) Yes\n (B) No")
    prompt = tokens(template.render(messages))
    full = tokens(template.render_answer(messages, "(A"))
    assert piece(full[0]) == "<s>" and full.count(full[0]) == 1  # BOS from the template, once
    end = instruction_end(prompt, full)
    scored = full[shared_prefix(prompt, full):]
    assert [piece(t) for t in full[end - 3 : end + 1]] == ["▁[", "/", "INST", "]"]
    assert [piece(t) for t in scored] == ["▁(", "A"]
    assert piece(full[-1]) == "A"  # the token extraction reads
    # The old glued format even merges the instruction's last token: '](' 'A'.
    glued = tokens(template.render(messages) + "(A")
    assert [piece(t) for t in glued[-2:]] == ["](", "A"]
