"""The native engine on the real default model: steering lands exactly where the paper says."""

from __future__ import annotations

import numpy as np
import pytest

from caa_local import ControlVector, Engine, Model, Sampling
from caa_local.engine.engine import ContextFullError
from caa_local.engine.scoring import Choice, score_ab, score_ab_naive
from caa_local.core.templates import user_turn
from conftest import random_vector

pytestmark = pytest.mark.slow

MESSAGES = user_turn("Name three colours of the rainbow.")


@pytest.fixture(scope="module")
def engine(model: Model) -> Engine:
    return model.context(n_ctx=1024, n_threads=2)


def test_model_facts(engine: Engine) -> None:
    assert (engine.n_layer, engine.n_embd, engine.architecture) == (30, 576, "llama")
    assert "im_start" in engine.template.source


@pytest.mark.parametrize("layer", [1, 5, 17, 29])
def test_steering_adds_exactly_mult_v_at_block_output(engine: Engine, layer: int) -> None:
    tokens, steer_from = engine.prompt(MESSAGES)
    vector = random_vector(engine.n_embd, range(1, 30), 10.0)
    engine.unsteer()
    base = engine.layer_outputs(tokens, steer_from)
    engine.steer("v", vector, 2.5, [layer])
    steered = engine.layer_outputs(tokens, steer_from)
    engine.unsteer()
    shift = steered - base
    # Blocks before L are untouched; block L's output moves by exactly 2.5 * v.
    assert np.array_equal(shift[:layer], np.zeros_like(shift[:layer]))
    np.testing.assert_allclose(shift[layer], 2.5 * vector.directions[layer], atol=1e-3)
    if layer + 1 < engine.n_layer:
        assert np.linalg.norm(shift[layer + 1]) > 1.0


def test_multiplier_zero_equals_no_vector(engine: Engine) -> None:
    tokens, steer_from = engine.prompt(MESSAGES)
    engine.unsteer()
    plain = engine.logits_after(tokens, steer_from)
    engine.steer("v", random_vector(engine.n_embd, range(1, 30), 50.0), 0.0, [10])
    assert not engine.steering
    zero = engine.logits_after(tokens, steer_from)
    engine.unsteer()
    assert np.array_equal(plain, zero)


def test_position_mask_leaves_the_instruction_unsteered(engine: Engine) -> None:
    tokens, steer_from = engine.prompt(MESSAGES)
    layer = 8
    vector = random_vector(engine.n_embd, range(1, 30), 30.0)
    engine.steer("v", vector, 1.0, [layer])
    # The prompt up to the instruction end, the one position the mask steers at its end.
    head = tokens[: steer_from + 1]
    masked = engine.layer_outputs(head, steer_from)
    everything = engine.layer_outputs(head, 0)
    with engine.unsteered():
        plain = engine.layer_outputs(head, len(head))
    # The steered position moves by exactly the vector at its block, nothing before it...
    assert np.array_equal(masked[:layer], plain[:layer])
    np.testing.assert_allclose(masked[layer] - plain[layer], vector.directions[layer], atol=1e-3)
    # ...and the later blocks attend to a prefix decoded unsteered: had the mask leaked onto the
    # prefix, they would equal steering every position.
    assert not np.allclose(masked[layer + 1:], everything[layer + 1:], atol=1e-2)
    # Steering from the instruction end differs from steering everything and from none.
    masked = engine.logits_after(tokens, steer_from)
    everything = engine.logits_after(tokens, 0)
    nothing = engine.logits_after(tokens, len(tokens))
    assert not np.allclose(masked, everything) and not np.allclose(masked, nothing)
    engine.unsteer()


def test_instruction_end_is_the_last_prompt_token(engine: Engine) -> None:
    tokens, steer_from = engine.prompt(MESSAGES)
    assert steer_from == len(tokens) - 1
    with_answer, steer_from_answer = engine.prompt(MESSAGES, "(A")
    assert steer_from_answer == steer_from
    assert engine.detokenize(with_answer[steer_from + 1:]) == "(A"
    assert engine.detokenize(with_answer[: steer_from + 1]).endswith("<|im_start|>assistant\n") or \
        engine.detokenize(with_answer[: steer_from + 1], special=True).endswith("<|im_start|>assistant\n")


def test_chat_path_decodes_with_the_same_mask(engine: Engine) -> None:
    """generate() (unsteered prefix, then steered tail) picks the argmax of the masked logits."""
    engine.steer("v", random_vector(engine.n_embd, range(1, 30), 20.0), 1.0, [12])
    tokens, steer_from = engine.prompt(MESSAGES)
    expected = int(np.argmax(engine.logits_after(tokens, steer_from)))
    result = engine.generate(MESSAGES, Sampling(temperature=0.0, max_tokens=1))
    engine.unsteer()
    assert result.tokens == [expected] or (result.stop_reason == "eog" and engine.is_eog(expected))


def test_streamed_pieces_make_the_answer_and_kv_is_reused(engine: Engine) -> None:
    engine.unsteer()
    engine.reset()
    pieces: list[str] = []
    first = engine.generate(MESSAGES, Sampling(max_tokens=24), on_piece=pieces.append)
    assert "".join(pieces) == first.text == engine.detokenize(first.tokens)
    conversation = [*MESSAGES, {"role": "assistant", "content": first.text},
                    {"role": "user", "content": "And two more?"}]
    second = engine.generate(conversation, Sampling(max_tokens=12))
    assert second.n_reused_tokens >= first.n_prompt_tokens - 1
    fresh = engine.new_context()
    assert fresh.generate(conversation, Sampling(max_tokens=12)).tokens == second.tokens


def test_bad_buffers_are_refused(engine: Engine) -> None:
    from caa_local.engine import _native

    session = _native.Session(engine.model.native, 64, 1, 64)
    short = np.zeros((engine.n_layer - 2, engine.n_embd), np.float32)
    with pytest.raises(ValueError, match="expected"):
        session.set_steering(short, 1, 5)
    full = np.zeros((engine.n_layer - 1, engine.n_embd), np.float32)
    with pytest.raises(ValueError, match="outside 1..29"):
        session.set_steering(full, 0, 5)
    with pytest.raises(ValueError, match="outside 1..29"):
        session.set_steering(full, 3, 30)


def test_vector_from_another_model_is_refused(engine: Engine) -> None:
    from caa_local.core.errors import ModelMismatchError

    wrong = ControlVector("llama", {5: np.ones(4096, np.float32)})
    with pytest.raises(ModelMismatchError, match="4096 values, model n_embd is 576"):
        engine.steer("wrong", wrong, 1.0)
    beyond = ControlVector("llama", {31: np.ones(576, np.float32)})
    with pytest.raises(ModelMismatchError, match="direction.31"):
        engine.steer("beyond", beyond, 1.0)
    other = ControlVector("qwen2", {5: np.ones(576, np.float32)})
    with pytest.raises(ModelMismatchError, match="--any-arch"):
        engine.steer("other", other, 1.0)
    engine.steer("other", other, 1.0, any_arch=True)
    engine.unsteer()


def test_context_overflow_is_a_clear_error() -> None:
    small = Engine(n_ctx=64, n_threads=2)  # loads the model itself: Engine(path) is one context on it
    with pytest.raises(ContextFullError, match="does not fit"):
        small.generate(user_turn("word " * 400), Sampling(max_tokens=4))


def test_batched_scoring_equals_re_decoding(engine: Engine) -> None:
    """Prompts of different lengths in one batch (llama.cpp 0.3.36 mis-attends those if mixed)."""
    questions = [
        ("Is the sky blue?\n\n(A) Yes\n(B) No", "A", "B"),
        ("Pick one.\n (A) Tea\n (B) Coffee\n (C) Water, which is the healthiest drink of all", "C", "A"),
        ("Short?\n(A) y\n(B) n", "B", "A"),
    ]
    choices = [Choice(tuple(user_turn(q)), m, n) for q, m, n in questions]
    term = engine.make_term("v", random_vector(engine.n_embd, range(1, 30), 8.0), 1.5, [9])
    for setting in ((), (term,)):
        fast = score_ab(engine, choices, [setting])[0]
        slow = score_ab_naive(engine, choices, setting)
        np.testing.assert_allclose(fast.logp_matching, slow.logp_matching, atol=2e-3)
        np.testing.assert_allclose(fast.logp_not_matching, slow.logp_not_matching, atol=2e-3)
