"""Judge-free metrics on hand-written texts, the fluency guard, and perplexity on the real model."""

from __future__ import annotations

import os
import random

import pytest

from caa_local import Model
from caa_local.core.templates import user_turn
from caa_local.engine.scoring import perplexity
from caa_local.eval import metrics

FORMAL = (
    "The committee has completed its review of the proposal. However, further consideration of "
    "the financial implications is required before a decision regarding implementation can be made."
)
CASUAL = "Hey guys! Yeah, we're gonna check it out, it's kinda cool lol. Don't worry about that stuff, ok?"
ENTHUSIASTIC = "Wow, this is absolutely amazing! I'm so excited to try it! Best day ever!!"
TERSE = "It was fine. The meeting ended at noon. Nothing else happened."
FLUENT = (
    "The old lighthouse stands on a rocky island at the mouth of the harbour. Every night its lamp "
    "turns slowly, and ships use the light to find a safe way past the rocks."
)


def test_sentiment() -> None:
    assert metrics.sentiment("I love this wonderful day. Everything went great!") > 0.5
    assert metrics.sentiment("This is awful. I hate it and I feel miserable.") < -0.5
    assert metrics.sentiment("") == 0.0


def test_formality() -> None:
    assert metrics.formality(FORMAL) > 60 > 40 > metrics.formality(CASUAL)
    assert 0.0 <= metrics.formality("!!! lol lol") <= 100.0


def test_enthusiasm() -> None:
    assert metrics.enthusiasm(ENTHUSIASTIC) > 2.0
    assert metrics.enthusiasm(TERSE) == 0.0


def test_length_and_fluency() -> None:
    assert metrics.length("Two words") == 2.0
    assert metrics.distinct_2(FLUENT) == 1.0 and metrics.repetition(FLUENT) == 0.0
    loop = "I like it. " * 10
    assert metrics.repetition(loop) > 0.5 and metrics.distinct_2(loop) < 0.3


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", True), ("   ", True), ("I like it. " * 10, True), ("the the the the", True), ("!" * 30, True),
     ("no no no no no no no no no and then more words follow here", True), (FLUENT, False),
     ("Yes.", False), (TERSE, False)],
)
def test_degenerate(text: str, expected: bool) -> None:
    assert metrics.degenerate(text) is expected


def test_registry_and_summary() -> None:
    assert set(metrics.METRICS) >= {"sentiment", "formality", "enthusiasm", "length", "distinct_2", "repetition"}
    rows = [{"multiplier": 1.0, "answer": ENTHUSIASTIC, "perplexity": 3.0},
            {"multiplier": -1.0, "answer": TERSE}, {"multiplier": -1.0, "answer": ""}]
    summary = metrics.summarize(rows, ["enthusiasm"])
    assert [s["multiplier"] for s in summary] == [-1.0, 1.0]
    assert summary[0]["degenerate"] == 0.5 and summary[1]["enthusiasm"] > summary[0]["enthusiasm"]
    assert summary[1]["perplexity"] == 3.0 and "perplexity" not in summary[0]


@pytest.mark.slow
def test_perplexity_fluent_below_shuffled(model: Model) -> None:
    engine = model.context(n_ctx=512, n_threads=int(os.environ.get("CAA_TEST_THREADS", "1")))
    words = FLUENT.split()
    random.Random(0).shuffle(words)
    prompt = user_turn("Describe a lighthouse.")
    fluent, shuffled, empty = perplexity(engine, [prompt] * 3, [FLUENT, " ".join(words), ""])
    assert 1.0 < fluent < 60 and shuffled > 3 * fluent
    assert empty != empty  # NaN for an empty answer
