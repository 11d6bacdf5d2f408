"""The Engine contract on the real default model: one door to steering, several contexts on one
loaded model, cancellation, and KV reuse that never mixes steerings."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from caa_local import ControlVector, Engine, Model, Sampling
from caa_local.core.errors import CaaError
from caa_local.core.steering import SteeringTerm
from caa_local.core.templates import user_turn
from conftest import random_vector

pytestmark = pytest.mark.slow

MESSAGES = user_turn("Name three colours of the rainbow.")
GREEDY = Sampling(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def engine(model: Model) -> Engine:
    return model.context(n_ctx=1024, n_threads=1)


def test_steering_is_a_read_only_snapshot(engine: Engine) -> None:
    engine.unsteer()
    vector = random_vector(engine.n_embd, [10, 12], 8.0)
    before = engine.steering
    engine.steer("v", vector, 2.0, [10])
    assert not before and engine.steering.get("v").scale == 2.0  # the old snapshot did not change
    # Building on the snapshot makes a new one; the engine's steering changes only through it.
    grown = engine.steering.with_term(engine.make_term("w", vector, 1.0, [12]))
    assert grown.describe() == "v x+2 @ 10; w x+1 @ 12" and engine.steering.describe() == "v x+2 @ 10"
    with pytest.raises(AttributeError):
        engine.steering = before  # type: ignore[misc]
    engine.unsteer()


def test_terms_are_checked_where_they_meet_the_model_and_set_steering_is_all_or_nothing(engine: Engine) -> None:
    engine.unsteer()
    vector = random_vector(engine.n_embd, [10, 12], 8.0)
    term = engine.make_term("v", vector, 1.5, [12])
    engine.set_steering([term, term.at(scale=3.0)])  # same name: the later one wins
    assert engine.steering.describe() == "v x+3 @ 12"
    assert term.at(layer=10).describe() == "v x+1.5 @ 10" and term.at([10, 12], -1).describe() == "v x-1 @ 10,12"
    wrong = ControlVector("llama", {5: np.ones(64, np.float32)})
    with pytest.raises(CaaError, match="64 values"):
        engine.set_steering([term, SteeringTerm("w", wrong, 1.0, (5,))])
    assert engine.steering.describe() == "v x+3 @ 12"  # unchanged
    with pytest.raises(CaaError, match="no direction for layer 11"):
        term.at(layer=11)
    with pytest.raises(CaaError, match="finite"):
        term.at(scale=float("nan"))
    engine.unsteer()


def test_steered_restores_the_previous_steering_even_on_error(engine: Engine) -> None:
    engine.unsteer()
    vector = random_vector(engine.n_embd, [10], 8.0)
    engine.steer("outer", vector, 1.0)
    inner = engine.make_term("inner", vector, -2.0)
    with pytest.raises(RuntimeError), engine.steered([inner]):
        assert engine.steering.describe() == "inner x-2 @ 10"
        raise RuntimeError("boom")
    assert engine.steering.describe() == "outer x+1 @ 10"
    with engine.unsteered():
        assert not engine.steering
    assert engine.steering.describe() == "outer x+1 @ 10"
    engine.unsteer()


def test_positions_are_chosen_per_call(engine: Engine) -> None:
    tokens, steer_from = engine.prompt(MESSAGES)
    assert steer_from == len(tokens) - 1
    assert engine.prompt(MESSAGES, positions="all") == (tokens, 0)
    with pytest.raises(CaaError, match="positions must be one of"):
        engine.prompt(MESSAGES, positions="some")


def test_new_context_shares_the_model_not_the_steering(engine: Engine) -> None:
    engine.unsteer()
    other = engine.new_context(n_ctx=512)
    assert other.model is engine.model and other.n_ctx == 512 and other.n_layer == engine.n_layer
    engine.steer("v", random_vector(engine.n_embd, [10], 30.0), 1.0)
    assert not other.steering
    tokens, steer_from = engine.prompt(MESSAGES)
    steered = engine.logits_after(tokens, steer_from)
    plain = other.logits_after(tokens, steer_from)
    engine.unsteer()
    assert np.array_equal(plain, engine.logits_after(tokens, steer_from))
    assert not np.allclose(steered, plain, atol=1e-2)
    assert other.generate(MESSAGES, GREEDY).tokens == engine.generate(MESSAGES, GREEDY).tokens


def test_two_contexts_decode_from_two_threads(engine: Engine) -> None:
    """Greedy answers from two threads at once equal the single-threaded answers."""
    engine.unsteer()
    prompts = [user_turn("Write a haiku about rain."), user_turn("List four prime numbers.")]
    contexts = [engine.new_context(512), engine.new_context(512)]
    vector = random_vector(engine.n_embd, [12], 20.0)
    contexts[1].steer("v", vector, 1.0)
    alone = [c.generate(p, GREEDY).tokens for c, p in zip(contexts, prompts)]
    for c in contexts:
        c.reset()
    results: list[list[int] | None] = [None, None]
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait()
        results[i] = contexts[i].generate(prompts[i], GREEDY).tokens

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


def test_should_stop_ends_an_answer_between_tokens(engine: Engine) -> None:
    engine.unsteer()
    calls = 0

    def stop_after_three() -> bool:
        nonlocal calls
        calls += 1
        return calls > 3

    result = engine.generate(MESSAGES, Sampling(temperature=0.0, max_tokens=64), should_stop=stop_after_three)
    assert result.stop_reason == "stopped" and len(result.tokens) == 3
    # Stopped before the first prompt batch: no answer at all.
    engine.reset()
    early = engine.generate(MESSAGES, GREEDY, should_stop=lambda: True)
    assert (early.stop_reason, early.tokens, early.text) == ("stopped", [], "")
    # The next call is unaffected.
    assert engine.generate(MESSAGES, GREEDY).stop_reason in ("eog", "max_tokens")


def test_unsteered_answer_after_a_steered_turn_equals_a_fresh_engines(engine: Engine) -> None:
    """/compare's case: the cache holds a steered conversation; the unsteered answer to it must
    re-decode every position steering touched.

    llama.cpp's numbers depend slightly on how positions were split into decode calls (a batch
    of one token takes another matmul path), so the fresh context decodes the same chunks the
    engine's history did: the answers must then be identical, token for token.
    """
    engine.unsteer()
    engine.reset()
    engine.steer("v", random_vector(engine.n_embd, [8, 12], 20.0), 1.0, [8, 12])
    first = engine.generate(MESSAGES, GREEDY)
    conversation = [*MESSAGES, {"role": "assistant", "content": first.text},
                    {"role": "user", "content": "And two more?"}]
    steered = engine.generate(conversation, GREEDY)
    with engine.unsteered():
        unsteered = engine.generate(conversation, GREEDY)
    tokens, end_2 = engine.prompt(conversation)
    _, end_1 = engine.prompt(MESSAGES)
    # Reused: everything steering never touched (all but the instruction end, decoded steered).
    assert unsteered.n_reused_tokens == end_2 == len(tokens) - 1
    fresh = engine.new_context()
    fresh.extend(tokens[:end_1], steered=False)  # the chunks the engine decoded: first prompt,
    fresh.extend(tokens[end_1:end_2], steered=False)  # the second turn's history, then the rest
    assert fresh.generate(conversation, GREEDY).tokens == unsteered.tokens
    # The steering matters where the answers start (its logits; whether the greedy tokens then
    # differ depends on the CPU's arithmetic, so that is not what is checked).
    with engine.unsteered():
        plain_logits = engine.logits_after(tokens, end_2)
    assert not np.allclose(engine.logits_after(tokens, end_2), plain_logits, atol=1e-2)
    # Steered again: the instruction end is decoded with the steering again, and the answer is
    # the steered one; a fresh context steered the same way agrees.
    again = engine.generate(conversation, GREEDY)
    fresh.set_steering(engine.steering.terms)
    assert again.tokens == fresh.generate(conversation, GREEDY).tokens == steered.tokens
    engine.unsteer()


def test_kv_reuse_keeps_positions_decoded_with_the_requested_steering(engine: Engine) -> None:
    engine.unsteer()
    engine.reset()
    vector = random_vector(engine.n_embd, [10], 20.0)
    engine.steer("v", vector, 1.0)
    # positions="all": every prompt position is steered, so the steering decides what is reused.
    first = engine.generate(MESSAGES, GREEDY, positions="all")
    again = engine.generate(MESSAGES, GREEDY, positions="all")
    assert again.tokens == first.tokens
    assert again.n_reused_tokens == first.n_prompt_tokens - 1  # all but the last prompt token
    engine.steer("v", vector, 2.0)
    assert engine.generate(MESSAGES, GREEDY, positions="all").n_reused_tokens == 0
    engine.unsteer()
    assert engine.generate(MESSAGES, GREEDY).n_reused_tokens == 0  # the cache held x2 everywhere
    assert engine.generate(MESSAGES, GREEDY).n_reused_tokens == first.n_prompt_tokens - 1


def test_token_by_token_decoding_reuses_llama_cpps_graph(engine: Engine) -> None:
    """Each generated token is one llama_decode that reuses the previous compute graph (as
    llama.cpp's own CLI does), not a graph rebuilt per token."""
    context = engine.new_context(256)
    result = context.generate(MESSAGES, Sampling(temperature=0.0, max_tokens=16))
    counts = context.perf_counts()
    assert counts["single_decodes"] >= len(result.tokens) - 1 >= 8
    assert counts["graphs_reused"] >= counts["single_decodes"] - 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_the_steerability_probe_leaves_no_threads_on_the_calling_thread() -> None:
    """The probe computes on a thread of its own: a thread that computes a graph keeps an
    OpenMP team (OpenMP builds of llama.cpp), and more teams than cores make every decode of the
    process wait passively (a server's batch decoded 20% slower after the probe)."""
    model = Model()  # not probed yet
    counts: list[int] = []

    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    def caller() -> None:  # a fresh thread, as a server's request handler is: no team of its own
        counts.append(threads())
        model.require_steerable()
        deadline = time.monotonic() + 5  # the probe's threads may take a moment to exit
        while threads() != counts[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        counts.append(threads())

    thread = threading.Thread(target=caller)
    thread.start()
    thread.join()
    assert model._steerable and counts[1] == counts[0]
