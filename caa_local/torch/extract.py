"""CAA extraction with PyTorch (design.md §1), the reference backend: mean activation
difference between matching and not-matching answers, read at the output of every decoder
block. Prompts, read positions, the mean difference and the vector's metadata are shared with
the native backend (caa_local/core/extraction.py). ``read="answer-mean"`` averages over the
answer's tokens (``(`` and ``A`` where they are separate tokens). Measured: the ``(`` token is identical in both prompts
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

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from caa_local.core.extraction import (
    READS,
    MeanDifference,
    answer_prefix,
    check_request,
    encode,
    encode_pairs,
    make_vector,
    gguf_quantization,
)
from caa_local.torch.hf import ModelInfo, decoder_layers, input_device
from caa_local.torch.packed import PackedReader, StopForward, packable
from caa_local.core.errors import CaaError
from caa_local.core.templates import ChatTemplate
from caa_local.core.vector import ControlVector

if TYPE_CHECKING:
    from caa_local.core.datasets import ABItem

__all__ = ["READS", "MeanDifference", "answer_prefix", "block_reads", "differences", "example_activations",
           "extract", "extract_loop"]
Reads = tuple[list[int], npt.NDArray[np.float32], npt.NDArray[np.float32]]  # items, matching, not


def _tokenize(tokenizer: Any) -> Any:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode(
    tokenizer: Any, template: ChatTemplate, question: str, answer: str, read: str = "answer-letter"
) -> tuple[list[int], int]:
    """Token ids of prompt + answer prefix, and how many trailing tokens are the answer."""
    return encode(_tokenize(tokenizer), template, question, answer, read)


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
                raise StopForward

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
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([out[layer] for layer in layers], dim=1).numpy()


def _check(model: Any, items: Sequence[ABItem], layers: Sequence[int] | None, read: str) -> list[int]:
    return check_request(items, layers, read, len(decoder_layers(model)))


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
    pairs = encode_pairs(_tokenize(tokenizer), template, items, read)
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
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    quantization = dtype
    if info is not None and info.source == "gguf" and info.path is not None:
        quantization = f"{dtype} (dequantized from {gguf_quantization(info.path)})"
    return make_vector(
        acc, chosen, info.arch if info else str(model.config.model_type), read,
        behavior=behavior, dataset_sha256=dataset_sha256,
        model=info.name if info else str(getattr(model.config, "name_or_path", "")),
        model_sha256=(info.sha256 or "") if info else "", backend="torch", quantization=quantization,
    )



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
