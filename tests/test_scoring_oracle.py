"""A/B scores against an oracle that shares no code with the scorer: llama-cpp-python's own
model, tokenizer and logits (``Llama(logits_all=True)``), the prompt rendered from the GGUF's
template with jinja2 directly (as transformers renders chat templates), the control vector laid
out by hand for llama.cpp's ``llama_set_adapter_cvec``.

A bug in the scorer's tokenization, prompt joining, position mask or batching would move its
scores away from these; both run the same llama.cpp, so they agree up to the arithmetic of
different batch shapes.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from caa_local import Model
from caa_local.engine.scoring import Choice, score_ab
from conftest import random_vector

pytestmark = pytest.mark.slow
llama_cpp = pytest.importorskip("llama_cpp")

QUESTIONS = [
    ("Is the sky blue?\n\n(A) Yes\n(B) No", "A", "B"),
    ("Pick one.\n (A) Tea\n (B) Coffee\n (C) Water, which is the healthiest drink of all", "C", "A"),
]
LAYER = 9
# Measured on the CPU of the first run: no difference at all (the same llama.cpp kernels); the
# tolerance is the one the scorer's other paths are held to (tests/test_native.py), for CPUs
# where different batch shapes round differently.
ATOL = 2e-3


@pytest.fixture(scope="module")
def llm(model: Model) -> object:
    # Flash attention as llama.cpp's default ("auto") chooses on CPU, which the engine keeps;
    # llama-cpp-python turns it off unless asked (measured: 0.07 nats apart then).
    return llama_cpp.Llama(str(model.path), n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=True,
                           flash_attn=True, verbose=False)


def rendered(llm: object, question: str) -> str:
    """The generation prompt of one user turn, from the GGUF's own template source."""
    source = llm.metadata["tokenizer.chat_template"]  # type: ignore[attr-defined]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(messages=[{"role": "user", "content": question}],
                                          add_generation_prompt=True, bos_token="", eos_token="")


def set_vector(llm: object, n_layer: int, direction: np.ndarray | None) -> None:
    """llama.cpp's own control vector on llm's context: rows from layer 1, ``direction`` at LAYER."""
    n_embd = direction.shape[0] if direction is not None else 0
    if direction is None:
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, 0, -1, -1)  # type: ignore[attr-defined]
    else:
        buf = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
        buf[(LAYER - 1) * n_embd : LAYER * n_embd] = direction
        data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        rc = llama_cpp.llama_set_adapter_cvec(llm.ctx, data, buf.size, n_embd, LAYER, LAYER)  # type: ignore[attr-defined]
    assert rc == 0


def oracle_logp(llm: object, question: str, letter: str, steer_from: str, n_layer: int,
                direction: np.ndarray | None) -> float:
    """log p("(" + letter) after the prompt: the continuation's tokens, each scored from the
    logits of the position before it. ``steer_from``: "all" positions or the "response" mask
    (the generation prompt's last token on, as the paper steers ChatML prompts)."""
    text = rendered(llm, question)
    prompt = llm.tokenize(text.encode(), add_bos=False, special=True)  # type: ignore[attr-defined]
    full = llm.tokenize((text + "(" + letter).encode(), add_bos=False, special=True)  # type: ignore[attr-defined]
    shared = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    start = 0 if steer_from == "all" else min(shared, len(prompt)) - 1
    llm.reset()  # type: ignore[attr-defined]
    set_vector(llm, n_layer, None)
    if start:
        llm.eval(full[:start])  # type: ignore[attr-defined]
    set_vector(llm, n_layer, direction)
    llm.eval(full[start:])  # type: ignore[attr-defined]
    set_vector(llm, n_layer, None)
    logits = np.asarray(llm.scores[: len(full)], dtype=np.float64)  # type: ignore[attr-defined]
    total = 0.0
    for j in range(shared, len(full)):
        row = logits[j - 1]
        top = row.max()
        total += row[full[j]] - top - np.log(np.exp(row - top).sum())
    return float(total)


@pytest.mark.parametrize("positions", ["response", "all"])
def test_scores_equal_llama_cpp_pythons_own_logits(model: Model, llm: object, positions: str) -> None:
    engine = model.context(n_ctx=512, n_threads=2)
    vector = random_vector(model.n_embd, [LAYER], 20.0, seed=3)
    term = engine.make_term("v", vector, 1.0, [LAYER])
    choices = [Choice(({"role": "user", "content": q},), m, n) for q, m, n in QUESTIONS]
    plain, steered = score_ab(engine, choices, [(), (term,)], positions)
    for scores, direction in ((plain, None), (steered, vector.directions[LAYER])):
        expected = np.array([[oracle_logp(llm, q, letter, positions, model.n_layer, direction) for letter in (m, n)]
                             for q, m, n in QUESTIONS])
        np.testing.assert_allclose(scores.logp_matching, expected[:, 0], atol=ATOL)
        np.testing.assert_allclose(scores.logp_not_matching, expected[:, 1], atol=ATOL)
    # The vector moves the scores by far more than the tolerance: the comparison has teeth.
    assert np.abs(steered.logp_matching - plain.logp_matching).max() > 20 * ATOL


@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_flash_attention_asked_for_holds_in_every_context(model: Model, flash_attn: str) -> None:
    """--flash-attn reaches the scorer's contexts: each choice scores a whole prompt (decoded in
    one batch, as llama-cpp-python decodes it) as llama-cpp-python does with the same choice."""
    from caa_local.core.errors import CaaError

    with pytest.raises(CaaError, match="flash attention must be one of auto, off, on"):
        Model(model.path, flash_attn="fast")
    chosen = Model(model.path, flash_attn=flash_attn)
    llm = llama_cpp.Llama(str(model.path), n_ctx=512, n_threads=2, n_threads_batch=2, logits_all=True,
                          flash_attn=flash_attn == "on", verbose=False)
    q, m, n = QUESTIONS[1]
    choice = Choice(({"role": "user", "content": q},), m, n)
    (scores,) = score_ab(chosen.context(n_ctx=512, n_threads=2), [choice], [()], positions="all")
    expected = [oracle_logp(llm, q, letter, "all", model.n_layer, None) for letter in (m, n)]
    np.testing.assert_allclose([scores.logp_matching[0], scores.logp_not_matching[0]], expected, atol=ATOL)
