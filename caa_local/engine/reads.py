"""CAA extraction on the GGUF itself, through llama.cpp (no torch): ``extract --backend native``.

Block outputs (``l_out-N``, equal to transformers' ``hidden_states[N + 1]``, tests/test_parity.py)
are read by the native Reader: the prefix common to all prompts is decoded once, each pair's
shared part (everything before its answer) once, and the answers of many pairs go through one
``llama_decode``; only the rows that are read are copied out. Prompts, read positions, the mean
difference and the vector's metadata come from caa_local/core/extraction.py, shared with the
torch reference. Nothing is written here, so Ctrl-C (checked between decode calls) leaves
nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from caa_local.core.extraction import (
    MeanDifference,
    Pair,
    check_request,
    common_length,
    encode_pairs,
    make_vector,
    quantization_name,
)
from caa_local.core.errors import CaaError
from caa_local.core.locate import cached_sha256
from caa_local.core.vector import ControlVector
from caa_local.engine import _native
from caa_local.engine.engine import Engine

if TYPE_CHECKING:
    from caa_local.core.datasets import ABItem

KV_BUDGET_BYTES = 256 << 20  # KV cache of the pairs decoded side by side (one stream each)
Reads = tuple[list[int], npt.NDArray[np.float32], npt.NDArray[np.float32]]  # items, matching, not
Progress = Callable[[int], None]


def stream_bytes(engine: Engine, max_len: int) -> int:
    """KV cache of one reader stream holding prompts of up to ``max_len`` tokens."""
    return engine.model.kv_stream_bytes(max_len + 1)


def max_pairs(engine: Engine, batch_size: int, max_len: int, kv_budget_bytes: int = KV_BUDGET_BYTES) -> int:
    """Pairs decoded side by side: ``batch_size``, as far as their KV streams fit the budget
    (one stream more holds the common prefix)."""
    fit = kv_budget_bytes // max(stream_bytes(engine, max_len), 1) - 1
    return max(1, min(batch_size, fit, _native.LLAMA_MAX_SEQ - 1))


def read_pairs(engine: Engine, pairs: Sequence[Pair], layers: Sequence[int], batch_size: int = 8,
               progress: Progress | None = None, n_ctx: int = 4096,
               kv_budget_bytes: int = KV_BUDGET_BYTES) -> Iterator[Reads]:
    """(item indices, matching reads, not-matching reads) per batch of ``batch_size`` pairs;
    reads are (n, len(layers), n_embd), the mean block output over each prompt's read span.
    The reader has a context of its own (``n_ctx``: the longest prompt allowed), so the
    engine's own context may be small."""
    if batch_size < 1:
        raise CaaError(f"batch size {batch_size}: expected 1 or more")
    if not pairs:
        raise CaaError("extraction needs at least one A/B pair")
    seqs = [s for p in pairs for s in p.seqs]
    max_len = max(len(s) for s in seqs)
    if max_len > n_ctx:
        raise CaaError(f"a prompt of {max_len} tokens does not fit the context of {n_ctx} (use --ctx)")
    # Decoded once for all: the tokens every prompt starts with, up to the first read position.
    first_read = min(len(s) - n for p in pairs for s, n in zip(p.seqs, p.n_read))
    prefix = seqs[0][: common_length(seqs, min(first_read, *(p.shared for p in pairs)))]
    side_by_side = max_pairs(engine, batch_size, max_len, kv_budget_bytes)
    reader = engine.reader(prefix, layers, side_by_side, max_len)
    for start in range(0, len(pairs), side_by_side):
        chunk = pairs[start : start + side_by_side]
        out = reader.read([s for p in chunk for s in p.seqs], [p.shared for p in chunk],
                          [n for p in chunk for n in p.n_read])
        yield [p.index for p in chunk], out[:, 0], out[:, 1]
        if progress:
            progress(len(chunk))


def _prepare(engine: Engine, items: Sequence[ABItem], layers: Sequence[int] | None, read: str) -> tuple[list[int], list[Pair]]:
    chosen = check_request(items, layers, read, engine.n_layer)
    engine.require_steerable()  # a vector for an architecture that ignores vectors is useless
    return chosen, encode_pairs(engine.tokenize, engine.template, items, read)


def extract(engine: Engine, items: Sequence[ABItem], batch_size: int = 8, layers: Sequence[int] | None = None,
            read: str = "answer-letter", progress: Progress | None = None, *, behavior: str = "",
            dataset_sha256: str = "", n_ctx: int = 4096) -> ControlVector:
    """A CAA vector from the engine's own GGUF: per layer, the mean over pairs of
    act(matching) - act(not matching). ``layers`` defaults to every steerable layer."""
    chosen, pairs = _prepare(engine, items, layers, read)
    acc = MeanDifference()
    for _index, pos, neg in read_pairs(engine, pairs, chosen, batch_size, progress, n_ctx):
        acc.add(pos, neg)
    return make_vector(
        acc, chosen, engine.architecture, read, behavior=behavior, dataset_sha256=dataset_sha256,
        model=engine.model_path.name, model_sha256=cached_sha256(engine.model_path), backend="native",
        quantization=quantization_name(engine.meta("general.file_type")),
    )


def example_activations(engine: Engine, items: Sequence[ABItem], layers: Sequence[int], batch_size: int = 8,
                        read: str = "answer-letter", n_ctx: int = 4096) -> dict[str, npt.NDArray[np.float32]]:
    """Per-example block outputs at the read position, in the items' order: "matching" and
    "not_matching", each (n_items, len(layers), n_embd)."""
    chosen, pairs = _prepare(engine, items, layers, read)
    shape = (len(items), len(chosen), engine.n_embd)
    pos, neg = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
    for index, p, n in read_pairs(engine, pairs, chosen, batch_size, None, n_ctx):
        pos[index], neg[index] = p, n
    return {"matching": pos, "not_matching": neg}
