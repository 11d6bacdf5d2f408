"""Condition prompts read on the GGUF (no torch): each prompt's block outputs averaged over
its user message, through the extraction Reader (engine/reads.py). A prompt is decoded up to
the end of its user message only: causal attention makes the rows of the message the same as
in the full chat prompt. Prompts go two by two into the Reader's pairs (an odd one out is
paired with itself)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import numpy.typing as npt

from caa_local.core.condition import span_read
from caa_local.core.errors import CaaError
from caa_local.core.extraction import Pair, common_length
from caa_local.engine.engine import Engine
from caa_local.engine.reads import read_pairs


def prompt_reads(engine: Engine, prompts: Sequence[str], layers: Sequence[int], batch_size: int = 8,
                 n_ctx: int = 4096, progress: Callable[[int], None] | None = None) -> npt.NDArray[np.float32]:
    """(len(prompts), len(layers), n_embd): mean block output over each prompt's user message."""
    if not prompts:
        raise CaaError("no prompts to read")
    encoded = [span_read(engine.template, engine.tokenize, p) for p in prompts]
    pairs = []
    for k in range(0, len(encoded), 2):
        (a, na), (b, nb) = encoded[k], encoded[min(k + 1, len(encoded) - 1)]
        shared = common_length([a, b], min(len(a), len(b)) - 1)
        pairs.append(Pair(k // 2, (a, b), (na, nb), shared))
    out = np.empty((len(prompts), len(layers), engine.n_embd), dtype=np.float32)
    counted = (lambda n: progress(min(2 * n, len(prompts)))) if progress else None
    for index, first, second in read_pairs(engine, pairs, layers, batch_size, counted, n_ctx):
        for row, p in enumerate(index):
            out[2 * p] = first[row]
            if 2 * p + 1 < len(prompts):
                out[2 * p + 1] = second[row]
    return out
