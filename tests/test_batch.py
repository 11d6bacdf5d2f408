"""The batch: many differently steered sequences in one context, one llama_decode per step.

Equality is checked against the tolerance llama.cpp's own batching shows: the first test
measures how far the logits of unsteered sequences decoded together move from the same
sequences decoded alone (on this CPU, the measured figure is in the assertion message), and
every later comparison allows that much (at least ``FLOOR``). Greedy tokens are compared only
up to the first position whose top-2 margin is within twice the tolerance: past a near-tie
another CPU may legitimately pick the other token, and the rest of the answer then differs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from caa_local.core.errors import CaaError
from caa_local.core.vector import ControlVector
from caa_local.engine.batch import Batch, Conversation, sequences_within
from caa_local.engine.engine import CHAT_SAMPLING, ContextFullError, Engine, GenerationResult, Sampling
from caa_local.engine.model import Model
from caa_local.core.locate import load_vector

pytestmark = pytest.mark.slow

PROMPTS = (
    "How was your weekend?",
    "Can you recommend a good book?",
    "What should I cook for dinner tonight?",
    "Describe a perfect holiday.",
)
N = 16
GREEDY = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=N)
FLOOR = 1e-3  # the least tolerance allowed, in logits (typical logits here span about 30)
Logits = npt.NDArray[np.float32]
Decoded = tuple[GenerationResult, Logits]


@pytest.fixture(scope="module")
def model() -> Model:
    return Model()


@pytest.fixture(scope="module")
def engine(model: Model) -> Engine:
    return model.context(n_ctx=1024, n_threads=2)


@pytest.fixture(scope="module")
def solo(model: Model) -> Callable[[Conversation], Decoded]:
    """A conversation decoded alone (one sequence: llama.cpp's control vector), memoized."""
    alone = Batch(model, n_seq=1, n_ctx=512, n_threads=2)
    cache: dict[tuple, Decoded] = {}  # type: ignore[type-arg]

    def run(item: Conversation) -> Decoded:
        key = (tuple(item.tokens), item.steer_from, tuple((t.name, t.scale, t.layers, id(t.vector)) for t in item.terms),
               item.sampling, tuple(item.stops))
        if key not in cache:
            cache[key] = alone.run_logits([item])[0]
        return cache[key]

    return run


def conversation(engine: Engine, prompt: str, terms: Sequence = (), positions: str = "response",
                 sampling: Sampling = GREEDY) -> Conversation:
    tokens, steer_from = engine.prompt([{"role": "user", "content": prompt}], positions=positions)
    return Conversation(tokens, steer_from, tuple(terms), sampling)


def random_vector(engine: Engine, layers: Sequence[int], norm: float, seed: int) -> ControlVector:
    rng = np.random.default_rng(seed)
    directions = {}
    for layer in layers:
        v = rng.standard_normal(engine.n_embd)
        directions[layer] = (v / np.linalg.norm(v) * norm).astype(np.float32)
    return ControlVector(engine.architecture, directions, {})


def compare(a: Decoded, b: Decoded, tol: float) -> int:
    """Assert two greedy decodes agree: logits within ``tol`` and the same tokens, up to the
    first near-tie of ``a`` (returned: the positions compared; every one when no tie).
    ``b`` may carry no logits (then its tokens are compared with ``a``'s greedy choices)."""
    (ra, la), (rb, lb) = a, b
    for i in range(len(la)):
        if len(lb):
            if i >= len(lb):
                break
            diff = float(np.abs(la[i] - lb[i]).max())
            assert diff <= tol, f"position {i}: logits differ by {diff:.3g} > {tol:.3g}"
        top = np.partition(la[i], -2)[-2:]
        if top[1] - top[0] <= 2 * tol:
            return i
        if i < len(rb.tokens):
            assert ra.tokens[i] == rb.tokens[i], f"position {i}: greedy tokens differ"
        elif len(lb) == 0:
            break
    if len(lb):
        assert ra.tokens == rb.tokens and len(la) == len(lb)
    return min(len(ra.tokens), len(rb.tokens))


@pytest.fixture(scope="module")
def unsteered(model: Model, engine: Engine, solo: Callable[[Conversation], Decoded]
              ) -> tuple[list[Conversation], list[Decoded], float, dict[str, int]]:
    """Unsteered conversations decoded together, and llama.cpp's own batching tolerance: how far
    their logits move from the same conversations decoded alone (while the tokens agree)."""
    items = [conversation(engine, p) for p in PROMPTS]
    batch = Batch(model, n_seq=len(items), n_ctx=512, n_threads=2)
    together = batch.run_logits(items)
    worst = 0.0
    for item, (result, logits) in zip(items, together):
        single, single_logits = solo(item)
        for i in range(min(len(logits), len(single_logits))):
            worst = max(worst, float(np.abs(logits[i] - single_logits[i]).max()))
            if i < min(len(result.tokens), len(single.tokens)) and result.tokens[i] != single.tokens[i]:
                break
    print(f"llama.cpp batching moves unsteered logits by at most {worst:.3g} here")
    assert worst < 0.5, f"batched logits differ from single ones by {worst:.3g}: batching is broken"
    return items, together, max(2 * worst, FLOOR), batch.counters()


@pytest.fixture(scope="module")
def tolerance(unsteered: tuple[list[Conversation], list[Decoded], float, dict[str, int]]) -> float:
    return unsteered[2]


def test_unsteered_sequences_decoded_together_equal_each_alone(
        unsteered: tuple[list[Conversation], list[Decoded], float, dict[str, int]],
        solo: Callable[[Conversation], Decoded]) -> None:
    items, together, tolerance, counters = unsteered
    for item, got in zip(items, together):
        compare(solo(item), got, tolerance)
    assert counters["decodes_rows"] == 0 and counters["decodes_cvec"] > 0  # nothing steered: no per-row work


@pytest.fixture(scope="module")
def mixed(engine: Engine) -> list[Conversation]:
    """Four conversations, each steered differently (one not at all, one on every position)."""
    _, sentiment = load_vector("sentiment")
    layer = sentiment.recommended_layer() or sentiment.layers[0]
    noise = random_vector(engine, (5, 6, 7), 20.0, seed=1)
    return [
        conversation(engine, PROMPTS[0]),
        conversation(engine, PROMPTS[1], [engine.make_term("s", sentiment, 6.0, [layer])]),
        conversation(engine, PROMPTS[2], [engine.make_term("n", noise, 1.0)]),
        conversation(engine, PROMPTS[3], [engine.make_term("s", sentiment, -6.0, [layer]),
                                          engine.make_term("n", noise, 0.5)], positions="all"),
    ]


def test_mixed_batch_equals_each_sequence_decoded_alone(model: Model, engine: Engine, mixed: list[Conversation],
                                                        solo: Callable[[Conversation], Decoded],
                                                        tolerance: float) -> None:
    batch = Batch(model, n_seq=len(mixed), n_ctx=512, n_threads=2)
    together = batch.run_logits(mixed)
    counters = batch.counters()
    assert counters["decodes_rows"] > 0 and counters["rows_added"] > 0  # the per-row path ran
    for item, got in zip(mixed, together):
        compare(solo(item), got, tolerance)  # alone: llama.cpp's control vector
    # ... and the single-sequence engine (Engine.generate_tokens) picks the same tokens.
    for item in mixed[1:3]:
        with engine.steered(item.terms):
            by_engine = engine.generate_tokens(item.tokens, item.steer_from, GREEDY)
        compare(solo(item), (by_engine, np.zeros((0, 1), np.float32)), tolerance)
    # The steering is real: a steered answer's logits move far beyond the tolerance.
    unsteered_first = solo(Conversation(mixed[1].tokens, mixed[1].steer_from, (), GREEDY))[1][0]
    assert float(np.abs(together[1][1][0] - unsteered_first).max()) > 100 * tolerance


def test_position_mask_holds_per_sequence(model: Model, mixed: list[Conversation],
                                          solo: Callable[[Conversation], Decoded], tolerance: float) -> None:
    """A sequence's unsteered prefix in a mixed batch equals an unsteered decode."""
    steered = mixed[1]
    whole_prompt_unsteered = Conversation(steered.tokens, len(steered.tokens), steered.terms, steered.sampling)
    every_position = Conversation(steered.tokens, 0, steered.terms, steered.sampling)
    batch = Batch(model, n_seq=4, n_ctx=512, n_threads=2)
    results = batch.run_logits([mixed[0], whole_prompt_unsteered, every_position, steered])
    unsteered_first = solo(Conversation(steered.tokens, steered.steer_from, (), GREEDY))[1][0]
    # The first answer token is sampled at the prompt's last position: unsteered when the mask
    # starts after the prompt, whatever the other rows of the batch do.
    assert float(np.abs(results[1][1][0] - unsteered_first).max()) <= tolerance
    # The response mask (instruction end on) and every position give other, distinct logits,
    # each as its alone decode gives them.
    for got, item in ((results[3], steered), (results[2], every_position)):
        compare(solo(item), got, tolerance)
        assert float(np.abs(got[1][0] - unsteered_first).max()) > 100 * tolerance
    assert float(np.abs(results[3][1][0] - results[2][1][0]).max()) > 100 * tolerance


def test_per_row_directions_equal_the_control_vector(model: Model, mixed: list[Conversation],
                                                     solo: Callable[[Conversation], Decoded],
                                                     tolerance: float) -> None:
    by_rows_batch = Batch(model, n_seq=1, n_ctx=512, n_threads=2)
    by_rows_batch.force_rows = True
    for item in (mixed[1], mixed[3]):
        by_rows = by_rows_batch.run_logits([item])[0]
        compare(solo(item), by_rows, tolerance)
        diff = max(float(np.abs(a - b).max()) for a, b in zip(solo(item)[1], by_rows[1]))
        print(f"per-row vs control vector: max logit difference {diff:.3g}")
    counters = by_rows_batch.counters()
    assert counters["decodes_cvec"] == 0 and counters["rows_added"] > 0


def test_sequences_leave_and_join_between_steps(model: Model, mixed: list[Conversation],
                                                solo: Callable[[Conversation], Decoded], tolerance: float) -> None:
    """Four requests on two sequences, with different budgets: each joins when one leaves."""
    budgets = [4, 12, 6, N]
    items = [dataclasses.replace(item, sampling=dataclasses.replace(GREEDY, max_tokens=b))
             for b, item in zip(budgets, mixed)]
    batch = Batch(model, n_seq=2, n_ctx=512, n_threads=2)
    ids = [batch.submit(item) for item in items]
    assert batch.waiting == len(items)
    texts = {i: "" for i in ids}
    results: dict[int, GenerationResult] = {}
    most_live = 0
    while len(results) < len(ids):
        for event in batch.step():
            texts[event.id] += event.piece
            if event.result is not None:
                results[event.id] = event.result
        most_live = max(most_live, batch.live)
    assert most_live == 2 and batch.live == 0 and batch.waiting == 0
    for id_, item, budget, full in zip(ids, items, budgets, mixed):
        result = results[id_]
        assert result.text == texts[id_]
        assert len(result.tokens) <= budget
        compare(solo(full), (result, np.zeros((0, 1), np.float32)), tolerance)  # greedy: a prefix of the full answer


def test_a_gap_in_the_live_sequences_keeps_each_rows_steering(model: Model, mixed: list[Conversation],
                                                                solo: Callable[[Conversation], Decoded],
                                                                tolerance: float) -> None:
    """Sequence 1 leaves first: llama.cpp then splits each decode of the mixed rows around the
    hole (one ubatch per run of consecutive sequence ids); every row keeps its own direction."""
    budgets = [N, 2, N, N]
    items = [dataclasses.replace(item, sampling=dataclasses.replace(GREEDY, max_tokens=b))
             for b, item in zip(budgets, mixed)]
    batch = Batch(model, n_seq=len(items), n_ctx=512, n_threads=2)
    together = batch.run_logits(items)
    assert batch.counters()["decodes_rows"] > 0
    assert len(together[1][0].tokens) == 2 and len(together[2][0].tokens) > 3  # decoded after the hole opened
    for item, got in zip(items, together):
        compare(solo(item), got, tolerance)


def test_perplexities_equal_the_engines_and_each_turn_starts_from_the_last(
        model: Model, engine: Engine, solo: Callable[[Conversation], Decoded], tolerance: float) -> None:
    """A conversation scored and answered turn by turn in one batch: each perplexity equals the
    engine's (its own context, the whole prompt decoded anew) within the batching tolerance, and
    the second turn, answered from the KV its scored first turn left, equals it decoded alone."""
    from caa_local.engine.scoring import answer_span, perplexity

    batch = Batch(model, n_seq=2, n_ctx=512, n_threads=2)
    first = [{"role": "user", "content": PROMPTS[0]}]
    answer = batch.run([conversation(engine, PROMPTS[0])])[0].text
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "Why?"}]
    got = [batch.perplexities([answer_span(engine, first, answer)[::2]])[0]]
    item = Conversation(*engine.prompt(second), (), GREEDY)
    reply = batch.run([item])[0]
    assert reply.n_reused_tokens >= len(engine.prompt(first, answer)[0]) - 1  # the scored turn's KV
    compare(solo(item), (reply, np.zeros((0, 1), np.float32)), tolerance)
    got += batch.perplexities([answer_span(engine, second, reply.text)[::2], ([1, 2], 2)])
    want = perplexity(engine, [first, second], [answer, reply.text])
    for g, w in zip(got, want):
        assert abs(np.log(g) - np.log(w)) <= 2 * tolerance, (got, want)
    assert np.isnan(got[2])  # nothing to score


def test_answers_to_one_prompt_scored_together_each_keep_their_kv(model: Model, engine: Engine,
                                                                  mixed: list[Conversation]) -> None:
    """Two steerings answer one prompt and both answers are scored in one call (calibration's
    search does this for both sides): each scored conversation keeps its own sequence, so
    each follow-up reuses its whole first turn. (A scoring request ends as it is admitted; a
    later one of the same call must not overwrite the sequence it left.)"""
    from caa_local.engine.scoring import answer_span

    batch = Batch(model, n_seq=4, n_ctx=512, n_threads=2)
    items = [mixed[0], dataclasses.replace(mixed[1], tokens=mixed[0].tokens, steer_from=mixed[0].steer_from)]
    answers = [r.text for r in batch.run(items)]
    assert answers[0] != answers[1]
    first = [{"role": "user", "content": PROMPTS[0]}]
    batch.perplexities([answer_span(engine, first, a)[::2] for a in answers])
    follow_ups = [Conversation(*engine.prompt([*first, {"role": "assistant", "content": a},
                                               {"role": "user", "content": "Why?"}]), item.terms, GREEDY)
                  for a, item in zip(answers, items)]
    for reply, answer in zip(batch.run(follow_ups), answers):
        assert reply.n_reused_tokens >= len(engine.prompt(first, answer)[0]) - 1


def test_kept_logprobs_score_unsteered_answers_as_a_fresh_decode_does(
        model: Model, engine: Engine, mixed: list[Conversation], tolerance: float) -> None:
    """With keep_logprobs, the perplexity of an unsteered answer comes from what its decode
    sampled, and equals the one a batch without that cache decodes anew (within the batching
    tolerance); a steered answer is decoded again under no steering, as before."""
    from caa_local.engine.scoring import answer_span

    chat = dataclasses.replace(CHAT_SAMPLING, max_tokens=N, seed=3)
    items = [dataclasses.replace(item, sampling=chat) for item in mixed[:2]]  # unsteered, steered
    prompts = [PROMPTS[0], PROMPTS[1]]
    got, cached = [], []
    for keep in (True, False):
        batch = Batch(model, n_seq=2, n_ctx=512, n_threads=2)
        batch.keep_logprobs = keep
        answers = [r.text for r in batch.run(items)]
        spans = [answer_span(engine, [{"role": "user", "content": p}], a)[::2] for p, a in zip(prompts, answers)]
        got.append(batch.perplexities(spans))
        cached.append(batch.counters()["scored_from_cache"])
    n_answer = len(spans[0][0]) - spans[0][1]
    assert cached[1] == 0 and n_answer // 2 <= cached[0] <= n_answer  # the unsteered answer, from the cache
    for g, w in zip(*got):
        assert abs(np.log(g) - np.log(w)) <= 2 * tolerance, got


def test_cancel_stops_one_request_and_the_others_go_on(model: Model, mixed: list[Conversation]) -> None:
    batch = Batch(model, n_seq=2, n_ctx=512, n_threads=2)
    keep, drop, queued = (batch.submit(item) for item in mixed[:3])
    done: dict[int, GenerationResult] = {}
    for _ in range(3):
        for event in batch.step():
            assert event.result is None
    batch.cancel(drop)
    batch.cancel(queued)
    while len(done) < 3:
        for event in batch.step():
            if event.result is not None:
                done[event.id] = event.result
    assert done[drop].stop_reason == "stopped" and 0 < len(done[drop].tokens) < N
    assert done[queued].stop_reason == "stopped" and done[queued].tokens == []
    assert done[keep].stop_reason in ("eog", "max_tokens") and len(done[keep].tokens) > 3


def test_stop_strings_end_an_answer_before_them(model: Model, engine: Engine,
                                                solo: Callable[[Conversation], Decoded]) -> None:
    item = conversation(engine, PROMPTS[1])
    full = solo(item)[0]
    words = full.text.split()
    assert len(words) > 4, full.text
    stop = " " + words[3]
    cut = Batch(model, n_seq=1, n_ctx=256, n_threads=2).run([Conversation(item.tokens, item.steer_from, (), GREEDY,
                                                                          (stop,))])[0]
    assert cut.stop_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_a_follow_up_reuses_the_cached_conversation(model: Model, engine: Engine, mixed: list[Conversation],
                                                    tolerance: float) -> None:
    """A second turn reuses the first turn's KV in a mixed batch as it does alone. (Against a
    fresh decode the logits move: llama.cpp's results depend on where a prompt's llama_decode
    calls split it, by up to 0.72 in a logit on the default model here, reuse or not.)"""
    def two_turns(batch_size: int) -> tuple[Decoded, Decoded]:
        batch = Batch(model, n_seq=batch_size, n_ctx=512, n_threads=2)
        first = batch.run_logits([mixed[2], *mixed[3:3 + batch_size - 1]])[0]
        messages = [{"role": "user", "content": PROMPTS[2]}, {"role": "assistant", "content": first[0].text},
                    {"role": "user", "content": "Why?"}]
        tokens, steer_from = engine.prompt(messages)
        follow_up = Conversation(tokens, steer_from, mixed[2].terms, GREEDY)
        again = batch.run_logits([follow_up, *mixed[:batch_size - 1]])[0]
        assert again[0].n_reused_tokens > len(tokens) // 2
        return first, again

    (first_alone, again_alone), (first_mixed, again_mixed) = two_turns(1), two_turns(2)
    compare(first_alone, first_mixed, tolerance)
    if first_alone[0].tokens == first_mixed[0].tokens:  # else a near-tie gave two other histories
        compare(again_alone, again_mixed, tolerance)


def test_sequences_within_keep_a_batch_inside_its_kv_budget(model: Model) -> None:
    """A batch a command sizes itself holds as many sequences as fit the KV budget: the KV one
    token takes (as llama.cpp saves a sequence's state: its K and V plus a few bytes naming the
    cell) times the padded context, never fewer than one; the context llama.cpp builds holds them."""
    import llama_cpp as lc

    params = lc.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 512, 100, 100
    weights = lc.llama_model_load_from_file(str(model.path).encode(), lc.llama_model_default_params())
    ctx = lc.llama_init_from_model(weights, params)
    batch = lc.llama_batch_init(100, 0, 1)
    tokens = model.tokenize("one two three four " * 60)
    saved = []
    try:
        for start in (0, 100):
            for k in range(100):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = tokens[start + k], start + k, 1, False
                batch.seq_id[k][0] = 0
            batch.n_tokens = 100
            assert lc.llama_decode(ctx, batch) == 0
            saved.append(lc.llama_state_seq_get_size(ctx, 0))
    finally:
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)
        lc.llama_model_free(weights)
    assert model.kv_bytes_per_token <= (saved[1] - saved[0]) / 100 <= model.kv_bytes_per_token + 64
    per_sequence = 768 * model.kv_bytes_per_token  # 700 tokens pad to 768
    assert model.kv_stream_bytes(700) == per_sequence
    assert sequences_within(model, 16, 700) == 16
    assert sequences_within(model, 16, 700, kv_budget_bytes=3 * per_sequence + 1) == 3
    assert sequences_within(model, 16, 700, kv_budget_bytes=per_sequence - 1) == 1
    n_seq = sequences_within(model, 8, 700, kv_budget_bytes=2 * per_sequence)
    assert Batch(model, n_seq=n_seq, n_ctx=700, n_threads=2).n_seq == 2


def test_bad_requests_get_one_clear_error(model: Model, engine: Engine) -> None:
    batch = Batch(model, n_seq=2, n_ctx=256, n_threads=2)
    with pytest.raises(CaaError, match="empty"):
        batch.run([Conversation([], 0)])
    with pytest.raises(CaaError, match="steer_from"):
        batch.run([Conversation([1, 2, 3], 4)])
    with pytest.raises(ContextFullError, match="does not fit"):
        batch.submit(Conversation([1] * 600, 0))
    with pytest.raises(CaaError, match="not in the vocabulary"):
        batch.submit(Conversation([model.n_vocab + 5], 0))
    with pytest.raises(CaaError, match="max tokens"):
        batch.submit(Conversation([1, 2], 0, (), Sampling(max_tokens=0)))
    with pytest.raises(CaaError, match="sequences"):
        Batch(model, n_seq=0)
    assert batch.live == 0 and batch.waiting == 0


def test_a_prefix_another_sequence_decoded_is_copied_not_decoded_again(
        model: Model, mixed: list[Conversation], solo: Callable[[Conversation], Decoded], tolerance: float) -> None:
    """One prompt under two steerings at once, after a sequence has answered it: the first takes
    its own cache back, the second (on an empty sequence) copies the unsteered prefix from the
    first one's, running, and decodes only the rest; both answer as if decoded alone."""
    plain, steered = mixed[0], dataclasses.replace(mixed[1], tokens=mixed[0].tokens, steer_from=mixed[0].steer_from)
    batch = Batch(model, n_seq=2, n_ctx=512, n_threads=2)
    batch.run([plain])
    assert batch.counters()["prefixes_shared"] == 0
    results = batch.run_logits([plain, steered])
    assert batch.counters()["prefixes_shared"] == 1
    assert [r.n_reused_tokens for r, _ in results] == [len(plain.tokens) - 1, plain.steer_from]
    for item, got in zip((plain, steered), results):
        compare(solo(item), got, tolerance)
    # Nothing to gain (a prefix shorter than the copy is worth): decoded in place, not copied.
    short = dataclasses.replace(plain, tokens=plain.tokens[:8], steer_from=8)
    fresh = Batch(model, n_seq=2, n_ctx=512, n_threads=2)
    fresh.run([short, dataclasses.replace(short, sampling=dataclasses.replace(GREEDY, seed=1))])
    assert fresh.counters()["prefixes_shared"] == 0
