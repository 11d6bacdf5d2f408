"""Extraction, the layer convention, torch steering and the GGUF conversion cache.

The torch-marked tests use the real default model (loaded once, see conftest.py) on short
prompts; the aggregation is tested separately on synthetic ground truth.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from caa_local.core.datasets import ABItem
from caa_local.core.errors import CaaError, LayerRangeError, ModelLoadError
from caa_local.torch.extract import (
    MeanDifference,
    _encode,
    answer_prefix,
    differences,
    extract,
    extract_loop,
)
from caa_local.torch.hf import cached_sha256, decoder_layers, load_hf
from caa_local.core.layers import hidden_state_index
from caa_local.core.locate import file_sha256
from caa_local.core.templates import user_turn
from caa_local.torch.steer import block_outputs, steer
from caa_local.core.vector import ControlVector

pytestmark = pytest.mark.slow

ITEMS = [
    ABItem("Is the sky blue?\n (A) Yes\n (B) No", "(A)", "(B)"),
    ABItem("Do cats bark?\n (A) Yes\n (B) No", "(B)", "(A)"),
    ABItem("Is ice cold?\n (A) No\n (B) Yes", "(B)", "(A)"),
    ABItem("Is fire hot?\n (A) Yes\n (B) No", "(A)", "(B)"),
    ABItem("Can fish fly?\n (A) No\n (B) Yes", "(A)", "(B)"),
    ABItem("Is water wet? Answer honestly, please.\n (A) Yes\n (B) No", "(A)", "(B)"),
    ABItem("Is two more than three?\n (A) Yes\n (B) No", "(B)", "(A)"),
    ABItem("Do birds have feathers?\n (A) No\n (B) Yes", "(B)", "(A)"),
]


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float32 reassociation noise, relative to the vector's norm."""
    return float(np.abs(a - b).max()) <= 1e-5 * max(1.0, float(np.linalg.norm(b)))


def _ids(tokenizer: Any, template: Any, question: str) -> torch.Tensor:
    text = template.render(user_turn(question), add_generation_prompt=True)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


# -- aggregation on synthetic ground truth (no model) ---------------------------------------
def test_mean_difference_recovers_planted_direction() -> None:
    rng = np.random.default_rng(0)
    n_pairs, n_layers, n_embd = 200, 3, 576
    delta = rng.normal(size=(n_layers, n_embd))
    base = rng.normal(scale=3.0, size=(n_pairs, n_layers, n_embd))
    pos = base + delta + rng.normal(size=base.shape)
    neg = base + rng.normal(size=base.shape)
    acc = MeanDifference()
    for start in range(0, n_pairs, 7):  # uneven batches
        acc.add(pos[start : start + 7], neg[start : start + 7])
    got = acc.result()
    assert got.dtype == np.float32 and got.shape == (n_layers, n_embd) and acc.count == n_pairs
    np.testing.assert_allclose(got, (pos - neg).mean(axis=0), rtol=1e-5, atol=1e-5)
    for layer in range(n_layers):
        cos = got[layer] @ delta[layer] / (np.linalg.norm(got[layer]) * np.linalg.norm(delta[layer]))
        assert cos > 0.99


def test_mean_difference_rejects_bad_input() -> None:
    acc = MeanDifference()
    with pytest.raises(ValueError, match="no pairs"):
        acc.result()
    with pytest.raises(ValueError, match="equal shapes"):
        acc.add(np.zeros((2, 4)), np.zeros((3, 4)))


def test_answer_prefix() -> None:
    assert answer_prefix("(A)") == "(A"
    assert answer_prefix(" (H) ") == "(H"


# -- the layer convention --------------------------------------------------------------------
@pytest.mark.torch
def test_block_outputs_match_hidden_states(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    ids = _ids(tokenizer, template, "Name a colour.")
    blocks = block_outputs(model, ids)
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    n_layer = len(decoder_layers(model))
    assert blocks.shape == (n_layer, 1, ids.shape[1], model.config.hidden_size)
    assert len(hidden) == n_layer + 1
    for layer in range(n_layer - 1):
        torch.testing.assert_close(blocks[layer], hidden[hidden_state_index(layer)].float())
    # The last entry is after the final norm, not the raw output of the last block.
    last_raw, last_entry = blocks[-1], hidden[-1].float()
    assert last_raw.norm() > 3 * last_entry.norm()
    torch.testing.assert_close(model.model.norm(last_raw), last_entry)


@pytest.mark.torch
def test_read_position_is_the_answer_letter(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    ids, n_answer = _encode(tokenizer, template, ITEMS[0].question, "(B)")
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "B"
    assert n_answer == 2  # SmolLM2 splits "(B" into "(" + "B"
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n(B")


# -- extraction ------------------------------------------------------------------------------
@pytest.mark.torch
def test_batched_extraction_equals_loop_and_ignores_padding(
    hf_model: tuple[Any, Any, Any],
) -> None:
    model, tokenizer, template = hf_model
    batched = extract(model, tokenizer, template, ITEMS, batch_size=3, progress=False)
    loop = extract_loop(model, tokenizer, template, ITEMS, progress=False)
    left = extract(
        model, tokenizer, template, ITEMS, batch_size=8, progress=False, padding_side="left"
    )
    assert batched.layers == list(range(1, 30))
    assert batched.model_hint == "llama"
    for layer in batched.layers:
        assert _close(batched.directions[layer], loop.directions[layer]), layer
        assert _close(left.directions[layer], loop.directions[layer]), layer
    meta = batched.metadata
    assert meta["n_pairs"] == "8" and meta["read_position"] == "answer-letter"
    assert meta["normalization"] == "none" and meta["layers"] == "1-29"


@pytest.mark.torch
def test_differences_and_answer_mean(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    layers = [12, 3]
    diffs = differences(model, tokenizer, template, ITEMS, layers, batch_size=5, progress=False)
    assert diffs.shape == (len(ITEMS), 2, 576) and diffs.dtype == np.float32
    vec = extract(model, tokenizer, template, ITEMS, layers=layers, progress=False)
    for i, layer in enumerate(layers):
        assert _close(diffs[:, i].mean(axis=0), vec.directions[layer])
    # "(" precedes the letter and is the same token in both answers, so its difference is 0:
    # on a tokenizer that splits "(A", answer-mean is exactly half of answer-letter.
    mean = extract(model, tokenizer, template, ITEMS, layers=layers, read="answer-mean", progress=False)
    for layer in layers:
        assert _close(mean.directions[layer], 0.5 * vec.directions[layer])


@pytest.mark.torch
def test_extract_rejects_bad_arguments(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    with pytest.raises(LayerRangeError, match="valid: 1..29"):
        extract(model, tokenizer, template, ITEMS, layers=[0], progress=False)
    with pytest.raises(CaaError, match="read position"):
        extract(model, tokenizer, template, ITEMS, read="last", progress=False)
    with pytest.raises(CaaError, match="at least one"):
        extract(model, tokenizer, template, [], progress=False)


@pytest.mark.torch
def test_interrupted_extraction_leaves_no_hooks(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    blocks = decoder_layers(model)

    def interrupt(*_args: Any) -> None:
        raise KeyboardInterrupt

    def hook_counts() -> list[tuple[int, int]]:
        return [(len(b._forward_hooks), len(b._forward_pre_hooks)) for b in blocks]

    before = hook_counts()  # transformers itself may keep hooks for output_hidden_states
    handle = blocks[5].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            extract(model, tokenizer, template, ITEMS[:2], progress=False)
    finally:
        handle.remove()
    assert hook_counts() == before


# -- torch steering --------------------------------------------------------------------------
def _random_vector(layers: list[int], norm: float = 30.0) -> ControlVector:
    rng = np.random.default_rng(1)
    dirs = {}
    for layer in layers:
        v = rng.normal(size=576)
        dirs[layer] = (v / np.linalg.norm(v) * norm).astype(np.float32)
    return ControlVector("llama", dirs)


@pytest.mark.torch
def test_steer_multiplier_zero_is_exact(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    ids = _ids(tokenizer, template, "Tell me a joke.")
    with torch.inference_mode():
        plain = model(input_ids=ids).logits
        with steer(model, _random_vector([10]), 0.0, [10], from_position=3):
            zero = model(input_ids=ids).logits
    assert torch.equal(plain, zero)


@pytest.mark.torch
def test_steer_shifts_only_block_l_from_position(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    ids = _ids(tokenizer, template, "Tell me a joke.")
    layer, start, mult = 10, 5, 1.5
    vector = _random_vector([layer, 20])
    base = block_outputs(model, ids)
    with steer(model, vector, mult, [layer], from_position=start):
        steered = block_outputs(model, ids)
    shift = torch.from_numpy(vector.directions[layer].copy()) * mult
    torch.testing.assert_close(steered[layer, :, start:], base[layer, :, start:] + shift)
    assert torch.equal(steered[layer, :, :start], base[layer, :, :start])
    assert torch.equal(steered[: layer], base[: layer])  # block L-1 and earlier untouched
    assert not torch.allclose(steered[layer + 1, :, start:], base[layer + 1, :, start:])
    # transformers captures hidden_states with its own block hooks, installed on first use;
    # steering must run before them or hidden_states would show the unsteered output.
    with torch.inference_mode():
        model(input_ids=ids, output_hidden_states=True)
        with steer(model, vector, mult, [layer], from_position=start):
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(hidden[hidden_state_index(layer)].float(), steered[layer])
    with pytest.raises(LayerRangeError):
        with steer(model, vector, 1.0, [11]):
            pass


@pytest.mark.torch
def test_steer_per_row_starts_in_padded_batch(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    a = _ids(tokenizer, template, "Hi.")[0]
    b = _ids(tokenizer, template, "Tell me about the sea, please.")[0]
    width = max(len(a), len(b))
    ids = torch.zeros((2, width), dtype=torch.long)
    mask = torch.zeros((2, width), dtype=torch.long)
    for row, seq in enumerate((a, b)):  # left padding
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    starts = torch.tensor([width - 2, width - 4])
    layer, vector = 7, _random_vector([7])
    base = block_outputs(model, ids, mask, position_ids=positions)
    with steer(model, vector, -1.0, [layer], from_position=starts):
        steered = block_outputs(model, ids, mask, position_ids=positions)
    shift = -torch.from_numpy(vector.directions[layer].copy())
    for row, start in enumerate(starts.tolist()):
        torch.testing.assert_close(steered[layer, row, start:], base[layer, row, start:] + shift)
        assert torch.equal(steered[layer, row, :start], base[layer, row, :start])


@pytest.mark.torch
def test_steer_with_kv_cache_matches_full_pass(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    ids = _ids(tokenizer, template, "Count to three.")
    prompt_len, start = ids.shape[1] - 3, ids.shape[1] - 6
    vector = _random_vector([12])
    with torch.inference_mode(), steer(model, vector, 2.0, [12], from_position=start):
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :prompt_len], use_cache=True)
        cache, steps = out.cache, [out.logits[:, -1]]
        for col in range(prompt_len, ids.shape[1]):
            out = model(input_ids=ids[:, col : col + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[:, -1])
    incremental = torch.stack(steps, dim=1)
    torch.testing.assert_close(incremental, full[:, prompt_len - 1 :], atol=1e-3, rtol=1e-4)


# -- loading and the conversion cache --------------------------------------------------------
@pytest.mark.torch
def test_second_gguf_load_is_cached_and_identical(hf_model: tuple[Any, Any, Any]) -> None:
    model, tokenizer, template = hf_model
    ids = _ids(tokenizer, template, "Hello!")
    again, tokenizer2, info = load_hf(None)
    assert info.from_cache
    assert (info.n_layer, info.n_embd, info.arch) == (30, 576, "llama")
    assert info.sha256 == cached_sha256(info.path)
    assert tokenizer2.chat_template == tokenizer.chat_template
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).logits, again(input_ids=ids).logits)


def test_cached_sha256_tracks_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAA_LOCAL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "blob.bin"
    path.write_bytes(b"one")
    assert cached_sha256(path) == file_sha256(path)
    assert (tmp_path / "cache" / "hashes.json").is_file()
    path.write_bytes(b"three")
    assert cached_sha256(path) == file_sha256(path)


def test_load_hf_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file or directory"):
        load_hf(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        load_hf(fake)
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_hf(tmp_path)
    with pytest.raises(ModelLoadError, match="dtype"):
        load_hf(fake, dtype="int3")
