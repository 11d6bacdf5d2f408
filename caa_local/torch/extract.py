"""CAA extraction (design.md §1): mean activation difference between matching and
not-matching answers, read at the output of every decoder block.

Prompt per answer: the chat-templated user turn, the opened assistant turn, then ``(A`` (the
answer letter with its opening parenthesis). ``read="answer-letter"`` (the paper) reads the
last token of that text; ``read="answer-mean"`` averages over the answer's tokens (``(`` and
``A`` where they are separate tokens). Measured: the ``(`` token is identical in both prompts
of a pair (causal attention, same prefix), so its difference is 0 and answer-mean is exactly
answer-letter / n_answer_tokens (1/2 on SmolLM2): same direction, smaller norm.
``read="answer-text"`` continues with the chosen answer's whole text (``(A) It was lovely``)
and averages over those tokens: not the paper's method, but the one that carries a behavior
on the 135M default model, where the answer letter alone barely does (vectors/README.md).
Block outputs come from forward hooks, never from ``hidden_states[-1]`` (that one is after
the final norm). Nothing is written to disk here, so Ctrl-C simply leaves nothing behind.

Speed: :func:`extract` decodes the prefix shared by all prompts once, each pair's shared
part once, and packs pairs into batches with no padding to speak of (packed_reads.py);
:func:`extract_loop` is the straightforward reference, one full forward pass per prompt.
"""

from __future__ import annotations

import re

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from caa_local.core.errors import CaaError
from caa_local.torch.hf import ModelInfo, decoder_layers, input_device
from caa_local.core.layers import check_steerable, format_layers, steerable_range
from caa_local.torch.packed import PackedReader, Pair, _Stop, common_length, packable
from caa_local.core.templates import ChatTemplate, instruction_end, user_turn
from caa_local.core.vector import ControlVector

if TYPE_CHECKING:
    from caa_local.core.datasets import ABItem

READS = ("answer-letter", "answer-mean", "answer-text")
Reads = tuple[list[int], npt.NDArray[np.float32], npt.NDArray[np.float32]]  # items, matching, not


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


def _encode(
    tokenizer: Any, template: ChatTemplate, question: str, answer: str, read: str = "answer-letter"
) -> tuple[list[int], int]:
    """Token ids of prompt + answer prefix, and how many trailing tokens are the answer.

    ``read="answer-text"`` continues with the whole text of the chosen answer.
    """
    prompt = template.render(user_turn(question), add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = choice_text(question, answer) if read == "answer-text" else answer_prefix(answer)
    ids = tokenizer(prompt + tail, add_special_tokens=False)["input_ids"]
    n_answer = len(ids) - 1 - instruction_end(prompt_ids, ids)
    return ids, max(n_answer, 1)


def _read_weights(mask: torch.Tensor, n_answer: Sequence[int], read: str) -> torch.Tensor:
    """(batch, seq) weights selecting the read positions, found from the attention mask."""
    batch, seq = mask.shape
    cols = torch.arange(seq).expand(batch, seq)
    last = torch.where(mask.bool(), cols, -1).max(dim=1).values  # last real token, any padding side
    span = torch.ones(batch, dtype=torch.long) if read == "answer-letter" else torch.tensor(n_answer)
    chosen = (cols <= last[:, None]) & (cols > (last - span)[:, None]) & mask.bool()
    return chosen.float() / chosen.sum(dim=1, keepdim=True).float()


def block_reads(
    model: Any,
    sequences: Sequence[Sequence[int]],
    n_answer: Sequence[int],
    layers: Sequence[int],
    read: str = "answer-letter",
    padding_side: str = "right",
    pad_id: int = 0,
) -> npt.NDArray[np.float32]:
    """One forward pass over padded ``sequences``: (batch, len(layers), n_embd) reads."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    # Positions from the mask, so a left-padded row gets the same RoPE positions as unpadded.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    weights = _read_weights(mask, n_answer, read)
    blocks = decoder_layers(model)
    deepest = max(layers)
    out: dict[int, torch.Tensor] = {}

    def make_hook(layer: int):  # noqa: ANN202
        def hook(_module: Any, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            w = weights.to(device=hidden.device, dtype=torch.float32)
            out[layer] = torch.einsum("bt,bte->be", w, hidden.float()).cpu()
            if layer == deepest:
                raise _Stop

        return hook

    handles = [blocks[layer].register_forward_hook(make_hook(layer)) for layer in layers]
    device = input_device(model)
    try:
        with torch.inference_mode():
            model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=False,
            )
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([out[layer] for layer in layers], dim=1).numpy()


def _check(model: Any, items: Sequence[ABItem], layers: Sequence[int] | None, read: str) -> list[int]:
    if read not in READS:
        raise CaaError(f"read position {read!r}: expected one of {', '.join(READS)}")
    if not items:
        raise CaaError("extraction needs at least one A/B pair")
    n_layer = len(decoder_layers(model))
    chosen = list(steerable_range(n_layer)) if layers is None else list(dict.fromkeys(layers))
    for layer in chosen:
        check_steerable(layer, n_layer)
    return chosen


def _encode_pairs(tokenizer: Any, template: ChatTemplate, items: Sequence[ABItem], read: str) -> list[Pair]:
    pairs = []
    for index, item in enumerate(items):
        (pos, n_pos), (neg, n_neg) = (_encode(tokenizer, template, item.question, answer, read)
                                      for answer in (item.matching, item.not_matching))
        shared = common_length([pos, neg], min(len(pos), len(neg)) - 1)
        spans = (1, 1) if read == "answer-letter" else (n_pos, n_neg)
        pairs.append(Pair(index, (pos, neg), spans, shared))
    return pairs


def _pair_reads(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    items: Sequence[ABItem],
    layers: Sequence[int],
    batch_size: int,
    read: str,
    padding_side: str,
    progress: bool,
    loop: bool = False,
) -> Iterator[Reads]:
    """(item indices, matching reads, not-matching reads) per batch, in no particular order.

    ``loop``: the per-example reference, one unpadded forward pass per prompt.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise CaaError(f"batch size {batch_size}: expected 1 or more")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pairs = _encode_pairs(tokenizer, template, items, read)
    with tqdm(total=len(items), unit="pair", desc="extract", disable=not progress) as bar:
        if loop or not packable(model):  # flash attention etc. cannot take the block mask
            for p in pairs:
                reads = [block_reads(model, [s], [n], layers, read) for s, n in zip(p.seqs, p.n_read)]
                yield [p.index], reads[0], reads[1]
                bar.update(1)
            return
        pairs.sort(key=lambda p: len(p.seqs[0]), reverse=True)  # similar lengths pack better
        reader = PackedReader(model, pairs, layers, pad_id, padding_side == "left")
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            reads = reader.reads(chunk).numpy()
            yield [p.index for p in chunk], reads[: len(chunk)], reads[len(chunk) :]
            bar.update(len(chunk))


def _ordered_reads(model: Any, tokenizer: Any, template: ChatTemplate, items: Sequence[ABItem],
                   layers: Sequence[int], batch_size: int, read: str, padding_side: str,
                   progress: bool) -> dict[str, npt.NDArray[np.float32]]:
    shape = (len(items), len(layers), int(model.config.hidden_size))
    pos, neg = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    for index, p, n in _pair_reads(model, tokenizer, template, items, layers, batch_size, read,
                                   padding_side, progress):
        pos[index], neg[index] = p, n
    return {"matching": pos, "not_matching": neg}


def example_activations(model: Any, tokenizer: Any, template: ChatTemplate, items: Sequence[ABItem],
                        layers: Sequence[int], batch_size: int = 8,
                        read: str = "answer-letter") -> dict[str, npt.NDArray[np.float32]]:
    """Per-example block outputs at the read position, in the items' order: "matching" and
    "not_matching", each (n_items, len(layers), n_embd)."""
    chosen = _check(model, items, layers, read)
    return _ordered_reads(model, tokenizer, template, items, chosen, batch_size, read, "right", False)


def extract(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    items: Sequence[ABItem],
    batch_size: int = 8,
    layers: Sequence[int] | None = None,
    read: str = "answer-letter",
    progress: bool = True,
    *,
    behavior: str = "",
    dataset_sha256: str = "",
    info: ModelInfo | None = None,
    padding_side: str = "right",
) -> ControlVector:
    """A CAA vector: per layer, the mean over pairs of act(matching) - act(not matching).

    ``layers`` defaults to every steerable layer (1 .. n_layer - 1); ``batch_size`` counts
    pairs per forward pass (see the module docstring for how a batch is decoded).
    """
    chosen = _check(model, items, layers, read)
    reads = _pair_reads(model, tokenizer, template, items, chosen, batch_size, read, padding_side, progress)
    return _vector(model, reads, chosen, read, behavior, dataset_sha256, info)


def _vector(model: Any, reads: Iterator[Reads], chosen: list[int], read: str, behavior: str,
            dataset_sha256: str, info: ModelInfo | None) -> ControlVector:
    acc = MeanDifference()
    for _index, pos, neg in reads:
        acc.add(pos, neg)
    mean = acc.result()
    metadata = {
        "behavior": behavior,
        "dataset_sha256": dataset_sha256,
        "n_pairs": str(acc.count),
        "model": info.name if info else str(getattr(model.config, "name_or_path", "")),
        "model_sha256": (info.sha256 or "") if info else "",
        "read_position": read,
        "normalization": "none",
        "layers": format_layers(chosen),
    }
    hint = info.arch if info else str(model.config.model_type)
    return ControlVector(hint, {layer: mean[i] for i, layer in enumerate(chosen)}, metadata)


def extract_loop(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    items: Sequence[ABItem],
    layers: Sequence[int] | None = None,
    read: str = "answer-letter",
    progress: bool = True,
    *,
    behavior: str = "",
    dataset_sha256: str = "",
    info: ModelInfo | None = None,
) -> ControlVector:
    """The straightforward reference for :func:`extract` (and its benchmark baseline): one full,
    unpadded forward pass per prompt, the matching and the not-matching prompt separately."""
    chosen = _check(model, items, layers, read)
    reads = _pair_reads(model, tokenizer, template, items, chosen, 1, read, "right", progress, loop=True)
    return _vector(model, reads, chosen, read, behavior, dataset_sha256, info)


def differences(
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    items: Sequence[ABItem],
    layers: Sequence[int],
    batch_size: int = 8,
    read: str = "answer-letter",
    progress: bool = True,
) -> npt.NDArray[np.float32]:
    """Per-pair differences act(matching) - act(not matching): (n_pairs, len(layers), n_embd)."""
    chosen = _check(model, items, layers, read)
    acts = _ordered_reads(model, tokenizer, template, items, chosen, batch_size, read, "right", progress)
    return acts["matching"] - acts["not_matching"]
