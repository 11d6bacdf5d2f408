"""CAA extraction shared by both backends (torch/extract.py and engine/reads.py): numpy only.

What a pair's prompts are, where they are read, how the reads become a vector, and what the
vector file records. The backends differ only in how they compute block outputs.

Prompt per answer: the chat-templated user turn, the opened assistant turn, then ``(A`` (the
answer letter with its opening parenthesis). ``read="answer-letter"`` (the paper) reads the
last token of that text; ``read="answer-mean"`` averages over the answer's tokens;
``read="answer-text"`` continues with the chosen answer's whole text (``(A) It was lovely``)
and averages over those tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError
from caa_local.core.layers import check_steerable, format_layers, steerable_range
from caa_local.core.templates import ChatTemplate, instruction_end, user_turn
from caa_local.core.vector import ControlVector

if TYPE_CHECKING:
    from caa_local.core.datasets import ABItem

READS = ("answer-letter", "answer-mean", "answer-text")
BACKENDS = ("native", "torch")
Tokenize = Callable[[str], Sequence[int]]  # text -> token ids, no special tokens added


@dataclass(frozen=True)
class Pair:
    """The two tokenized prompts of one A/B item and where each is read."""

    index: int  # position in the caller's items
    seqs: tuple[list[int], list[int]]  # token ids: matching, not matching
    n_read: tuple[int, int]  # read span (trailing tokens averaged) of each
    shared: int  # leading tokens both share (each keeps at least one of its own)


class MeanDifference:
    """Running mean of (positive - negative) over pairs; float64 sums, float32 result."""

    def __init__(self) -> None:
        self.total: npt.NDArray[np.float64] | None = None
        self.count = 0

    def add(self, positive: npt.ArrayLike, negative: npt.ArrayLike) -> None:
        """Add a batch of pairs: arrays of shape (n_pairs, ...) with equal shapes."""
        pos = np.asarray(positive, dtype=np.float64)
        neg = np.asarray(negative, dtype=np.float64)
        if pos.shape != neg.shape or pos.ndim < 1:
            raise ValueError(f"positive {pos.shape} and negative {neg.shape}: expected equal shapes")
        batch = (pos - neg).sum(axis=0)
        self.total = batch if self.total is None else self.total + batch
        self.count += pos.shape[0]

    def result(self) -> npt.NDArray[np.float32]:
        if self.total is None or self.count == 0:
            raise ValueError("no pairs were added")
        return (self.total / self.count).astype(np.float32)


def answer_prefix(answer: str) -> str:
    """'(A)' -> '(A': the answer up to and including its letter."""
    text = answer.strip()
    return text[:-1] if text.endswith(")") else text


def choice_text(question: str, answer: str) -> str:
    """'(A)' -> '(A) <the text of choice A in the question>'."""
    letter = answer.strip()[1:-1]
    match = re.search(r"\(" + re.escape(letter) + r"\)[ \t]*(.*?)(?=\n\s*\([A-H]\)|\Z)", question, re.S)
    if not match or not match.group(1).strip():
        raise CaaError(f"answer-text reads need the text of choice {answer} in the question")
    return f"({letter}) {match.group(1).strip()}"


def common_length(seqs: Sequence[Sequence[int]], limit: int) -> int:
    """Length of the longest common prefix of ``seqs``, at most ``limit``."""
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def encode(tokenize: Tokenize, template: ChatTemplate, question: str, answer: str,
           read: str = "answer-letter") -> tuple[list[int], int]:
    """Token ids of prompt + answer prefix, and how many trailing tokens are the answer.

    ``read="answer-text"`` continues with the whole text of the chosen answer.
    """
    messages = user_turn(question)
    prompt_ids = list(tokenize(template.render(messages, add_generation_prompt=True)))
    tail = choice_text(question, answer) if read == "answer-text" else answer_prefix(answer)
    # As the template joins an answer to the prompt: Llama-2's "[/INST] (A", the paper's read token.
    ids = list(tokenize(template.render_answer(messages, tail)))
    n_answer = len(ids) - 1 - instruction_end(prompt_ids, ids)
    return ids, max(n_answer, 1)


def encode_pairs(tokenize: Tokenize, template: ChatTemplate, items: Sequence[ABItem], read: str) -> list[Pair]:
    """Both prompts of every item, with their read spans and shared length."""
    pairs = []
    for index, item in enumerate(items):
        (pos, n_pos), (neg, n_neg) = (encode(tokenize, template, item.question, answer, read)
                                      for answer in (item.matching, item.not_matching))
        shared = common_length([pos, neg], min(len(pos), len(neg)) - 1)
        spans = (1, 1) if read == "answer-letter" else (n_pos, n_neg)
        pairs.append(Pair(index, (pos, neg), spans, shared))
    return pairs


def check_request(items: Sequence[object], layers: Sequence[int] | None, read: str, n_layer: int) -> list[int]:
    """The layers to read (default: every steerable one), after checking the request."""
    if read not in READS:
        raise CaaError(f"read position {read!r}: expected one of {', '.join(READS)}")
    if not items:
        raise CaaError("extraction needs at least one A/B pair")
    chosen = list(steerable_range(n_layer)) if layers is None else list(dict.fromkeys(layers))
    for layer in chosen:
        check_steerable(layer, n_layer)
    return chosen


def make_vector(acc: MeanDifference, layers: Sequence[int], model_hint: str, read: str, *,
                behavior: str = "", dataset_sha256: str = "", model: str = "", model_sha256: str = "",
                backend: str = "", quantization: str = "") -> ControlVector:
    """The CAA vector from the accumulated mean difference (rows in ``layers`` order), with the
    metadata both backends record."""
    mean = acc.result()
    metadata = {
        "behavior": behavior,
        "dataset_sha256": dataset_sha256,
        "n_pairs": str(acc.count),
        "model": model,
        "model_sha256": model_sha256,
        "read_position": read,
        "normalization": "none",
        "layers": format_layers(layers),
        "backend": backend,
        "quantization": quantization,
    }
    return ControlVector(model_hint, {layer: mean[i] for i, layer in enumerate(layers)}, metadata)


def quantization_name(file_type: int | str | None) -> str:
    """GGUF ``general.file_type`` (llama.cpp's ftype) as its name, e.g. 7 -> 'Q8_0', 3 -> 'Q4_1'."""
    import gguf

    try:
        name = gguf.LlamaFileType(int(file_type)).name  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def gguf_quantization(path: str | Path) -> str:
    """The quantization type recorded in a GGUF model file's header ('unknown' if none)."""
    import gguf

    try:
        field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
        return quantization_name(int(field.parts[field.data[0]][0])) if field else "unknown"
    except (OSError, ValueError, IndexError):
        return "unknown"

