"""Parity of the native engine (quantized GGUF in llama.cpp) with the PyTorch reference.

The same model file on both sides: transformers dequantizes it, llama.cpp runs it quantized.
Proves the layer convention (CAA layer L = block L = hidden_states[L + 1] = direction.L) and
that a vector steers llama.cpp the way a torch hook at the same block does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from caa_local import ControlVector, Engine, Model
from caa_local.core.layers import hidden_state_index
from caa_local.core.templates import user_turn

pytestmark = [pytest.mark.torch, pytest.mark.slow]
torch = pytest.importorskip("torch")

QUESTION = "Would you rather read a book or watch a film tonight?\n\n(A) A book\n(B) A film"


@pytest.fixture(scope="module")
def engine(model: Model) -> Engine:
    return model.context(n_ctx=1024, n_threads=2)


def prompt_ids(engine: Engine, hf: tuple[Any, Any, Any]) -> tuple[list[int], int]:
    tokens, steer_from = engine.prompt(user_turn(QUESTION), "(")
    _, tokenizer, template = hf
    text = template.render(user_turn(QUESTION), add_generation_prompt=True) + "("
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == tokens, "tokenizers disagree"
    return tokens, steer_from


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_templates_render_the_same_text(engine: Engine, hf_model: tuple[Any, Any, Any]) -> None:
    _, _, template = hf_model
    messages = [{"role": "system", "content": "Be brief."}, *user_turn("Hi")]
    assert engine.template.render(messages) == template.render(messages)


def test_layer_convention_native_block_n_is_hidden_states_n_plus_1(
    engine: Engine, hf_model: tuple[Any, Any, Any]
) -> None:
    model, _, _ = hf_model
    tokens, _ = prompt_ids(engine, hf_model)
    native = engine.layer_outputs(tokens, len(tokens))  # row N = llama.cpp l_out-N
    with torch.no_grad():
        out = model(torch.tensor([tokens]), output_hidden_states=True)
    hidden = [h[0, -1].float().numpy() for h in out.hidden_states]
    for layer in (3, 10, 15, 22):
        same = cosine(native[layer], hidden[hidden_state_index(layer)])
        before = cosine(native[layer], hidden[hidden_state_index(layer - 1)])
        after = cosine(native[layer], hidden[hidden_state_index(layer + 1)])
        assert same > 0.98, (layer, same)
        assert same > max(before, after) + 0.005, (layer, same, before, after)


@pytest.mark.parametrize("layer", [5, 10, 20])
def test_a_vector_steers_llama_cpp_like_a_torch_hook_at_the_same_block(
    engine: Engine, hf_model: tuple[Any, Any, Any], layer: int
) -> None:
    from caa_local.torch.steer import steer

    model, _, _ = hf_model
    tokens, steer_from = prompt_ids(engine, hf_model)
    rng = np.random.default_rng(layer)
    direction = rng.standard_normal(engine.n_embd).astype(np.float32)
    direction *= 30.0 / np.linalg.norm(direction)
    vector = ControlVector("llama", {layer - 1: direction, layer: direction, layer + 1: direction})

    engine.unsteer()
    base = engine.logits_after(tokens, steer_from)
    engine.steer("probe", vector, 1.0, [layer])
    native_shift = engine.logits_after(tokens, steer_from) - base
    engine.unsteer()

    ids = torch.tensor([tokens])

    def torch_shift(at: int) -> np.ndarray:
        with torch.no_grad():
            plain = model(ids).logits[0, -1].float().numpy()
            with steer(model, vector, 1.0, [at], steer_from):
                steered = model(ids).logits[0, -1].float().numpy()
        return steered - plain

    same = np.corrcoef(native_shift, torch_shift(layer))[0, 1]
    neighbours = [np.corrcoef(native_shift, torch_shift(at))[0, 1] for at in (layer - 1, layer + 1)]
    assert same > 0.9, same
    assert same > max(neighbours), (same, neighbours)


def test_extracted_vector_moves_both_backends_the_same_way(
    engine: Engine, hf_model: tuple[Any, Any, Any]
) -> None:
    from caa_local.core.datasets import load_ab, split
    from caa_local.torch.extract import extract
    from caa_local.torch.steer import steer

    model, tokenizer, template = hf_model
    items = split(load_ab("sentiment").items, "train")[:8]
    vector = extract(model, tokenizer, template, items, batch_size=4, layers=[8, 9, 10], progress=False)
    tokens, steer_from = prompt_ids(engine, hf_model)
    engine.unsteer()
    base = engine.logits_after(tokens, steer_from)
    engine.steer("sentiment", vector, 4.0, [9])
    native_shift = engine.logits_after(tokens, steer_from) - base
    engine.unsteer()
    with torch.no_grad():
        ids = torch.tensor([tokens])
        plain = model(ids).logits[0, -1].float().numpy()
        with steer(model, vector, 4.0, [9], steer_from):
            torch_shift = model(ids).logits[0, -1].float().numpy() - plain
    assert np.corrcoef(native_shift, torch_shift)[0, 1] > 0.9
