"""Fast block-output reads for extraction: shared prefixes decoded once, batches packed.

The two prompts of an A/B pair are identical up to the answer letter, and every prompt starts
with the same chat-template text. So:

1. the prefix common to all prompts is decoded once (batch 1), and its KV cache reused;
2. per pair, one *unit* of tokens: the matching prompt after that prefix, then the
   not-matching prompt's own tokens (its answer), which attend to the shared part but not
   to the matching answer;
3. units are packed first-fit into rows of one padded batch, with a block mask (4-D), so a
   batch of mixed lengths wastes almost nothing on padding, and one forward pass reads a
   whole batch of pairs.

About 2.3-2.9x fewer tokens than one pass per prompt on the paper's datasets, in far fewer
forward passes; no pass runs beyond the deepest block read (no final norm, no LM head).
Results equal the per-prompt loop up to float32 reassociation.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from caa_local.core.extraction import Pair, common_length
from caa_local.torch.hf import decoder_layers, input_device

__all__ = ["PackedReader", "Pair", "common_length", "forward_reads", "packable"]

MAX_PACK_WIDTH = 1024  # widest row tried when packing several units into one
PACKABLE = ("sdpa", "eager")  # attention implementations that honour a 4-D float mask


class StopForward(Exception):
    """Raised by the deepest needed hook: later blocks and the LM head are skipped."""


def packable(model: Any) -> bool:
    return getattr(model.config, "_attn_implementation", "eager") in PACKABLE


def cache_arg(model: Any) -> str:
    """The forward argument taking a KV cache: ``cache`` (transformers 5) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


Picks = list[tuple[int, int, int, float]]  # (row, column, output slot, weight)


def forward_reads(model: Any, layers: Sequence[int], ids: torch.Tensor, mask: torch.Tensor,
                  positions: torch.Tensor, cache: Any, picks: Picks, n_slots: int) -> torch.Tensor:
    """One pass up to the deepest of ``layers``, extending ``cache`` if given. Per output slot
    and layer: the sum of weight x block output at its picked (row, column) positions,
    as (n_slots, len(layers), n_embd) float32 on the CPU."""
    out = torch.zeros(n_slots, len(layers), int(model.config.hidden_size))
    rows, cols, slots, weights = (list(x) for x in zip(*picks)) if picks else ([], [], [], [])
    slot_index, weight = torch.tensor(slots, dtype=torch.long), torch.tensor(weights)
    deepest = max(layers)

    def make_hook(i: int, layer: int):  # noqa: ANN202
        def hook(_module: Any, _args: Any, output: Any) -> None:
            if rows:
                hidden = output[0] if isinstance(output, tuple) else output
                picked = hidden[rows, cols].float().cpu() * weight[:, None]
                out[:, i].index_add_(0, slot_index, picked)
            if layer == deepest:
                raise StopForward

        return hook

    blocks = decoder_layers(model)
    handles = [blocks[layer].register_forward_hook(make_hook(i, layer)) for i, layer in enumerate(layers)]
    device = input_device(model)
    kwargs = {"use_cache": True, cache_arg(model): cache} if cache is not None else {"use_cache": False}
    try:
        with torch.inference_mode():
            model(input_ids=ids.to(device), attention_mask=mask.to(device),
                  position_ids=positions.to(device), **kwargs)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return out


def _first_fit(lengths: Sequence[int], width: int) -> list[tuple[int, int]]:
    """(row, column) of each unit, longest first into the first row with room."""
    fill: list[int] = []
    place = [(0, 0)] * len(lengths)
    for unit in sorted(range(len(lengths)), key=lambda u: -lengths[u]):
        row = next((r for r, used in enumerate(fill) if used + lengths[unit] <= width), len(fill))
        if row == len(fill):
            fill.append(0)
        place[unit] = (row, fill[row])
        fill[row] += lengths[unit]
    return place


def _pack(lengths: Sequence[int], prefix: int, attention_cost: float) -> tuple[int, list[tuple[int, int]]]:
    """Row width and placements that minimise the estimated cost: rows x width columns, each
    costing 1 (weights) + ``attention_cost`` x the keys it sees (prefix + width)."""
    longest = max(lengths)
    best: tuple[float, int, list[tuple[int, int]]] | None = None
    for width in range(longest, max(longest, min(sum(lengths), MAX_PACK_WIDTH)) + 1, max(1, longest // 32)):
        place = _first_fit(lengths, width)
        cost = (1 + max(row for row, _ in place)) * width * (1 + attention_cost * (prefix + width))
        if best is None or cost < best[0]:
            best = (cost, width, place)
    assert best is not None
    return best[1], best[2]


class PackedReader:
    """Reads of batches of pairs; the prefix common to all of ``pairs`` is decoded here, once."""

    def __init__(self, model: Any, pairs: Sequence[Pair], layers: Sequence[int], pad_id: int,
                 left: bool = False) -> None:
        from transformers import DynamicCache

        self.model, self.layers, self.pad_id, self.left = model, list(layers), pad_id, left
        seqs = [s for p in pairs for s in p.seqs]
        self.g = common_length(seqs, min(p.shared for p in pairs))
        self.cache = DynamicCache()
        self.g_reads = torch.zeros(0)
        # Attention multiply-adds per key (2 x n_embd) over a block's weights (per token).
        weights = sum(t.numel() for t in decoder_layers(model)[0].parameters())
        self.attention_cost = 2.0 * int(model.config.hidden_size) / max(weights, 1)
        if self.g:  # its block outputs are kept only where some read falls inside it
            needed = any(len(s) - n < self.g for p in pairs for s, n in zip(p.seqs, p.n_read))
            picks = [(0, c, c, 1.0) for c in range(self.g)] if needed else []
            ids = torch.tensor([seqs[0][: self.g]])
            self.g_reads = forward_reads(model, self.layers, ids, torch.ones_like(ids),
                                         torch.arange(self.g)[None], self.cache, picks, len(picks))

    def reads(self, chunk: Sequence[Pair]) -> torch.Tensor:
        """(2 * len(chunk), len(layers), n_embd): the matching reads, then the not-matching."""
        g, n = self.g, len(chunk)
        units = [p.seqs[0][g:] + p.seqs[1][p.shared :] for p in chunk]
        width, place = _pack([len(u) for u in units], g, self.attention_cost)
        n_rows = 1 + max(row for row, _ in place)
        if self.left:  # padding before each row's units instead of after
            ends = [max(col + len(u) for (r, col), u in zip(place, units) if r == row) for row in range(n_rows)]
            place = [(row, col + width - ends[row]) for row, col in place]
        ids = torch.full((n_rows, width), self.pad_id, dtype=torch.long)
        positions = torch.full((n_rows, width), g, dtype=torch.long)
        allowed = torch.zeros((n_rows, width, g + width), dtype=torch.bool)
        allowed[:, :, g:] = torch.eye(width, dtype=torch.bool)  # padding sees itself: no NaN
        reads = torch.zeros(2 * n, len(self.layers), int(self.model.config.hidden_size))
        picks: Picks = []
        for r, (p, unit, (row, a)) in enumerate(zip(chunk, units, place)):
            pos, neg = p.seqs
            n_pos, n_mid = len(pos) - g, p.shared - g  # matching part; the part both share
            ids[row, a : a + len(unit)] = torch.tensor(unit, dtype=torch.long)
            positions[row, a : a + len(unit)] = torch.tensor(
                [*range(g, len(pos)), *range(p.shared, len(neg))], dtype=torch.long)
            k0 = g + a  # key column of the unit's first token
            allowed[row, a : a + len(unit), :g] = True
            allowed[row, a : a + n_pos, k0 : k0 + n_pos] = torch.ones(n_pos, n_pos, dtype=torch.bool).tril()
            n_neg = len(unit) - n_pos
            allowed[row, a + n_pos : a + len(unit), k0 : k0 + n_mid] = True
            allowed[row, a + n_pos : a + len(unit), k0 + n_pos : k0 + len(unit)] = torch.ones(
                n_neg, n_neg, dtype=torch.bool).tril()
            # Read positions -> (row, column); inside the common prefix -> its stored outputs.
            for slot, seq, n_read in ((r, pos, p.n_read[0]), (n + r, neg, p.n_read[1])):
                for q in range(len(seq) - n_read, len(seq)):
                    if q < g:
                        reads[slot] += self.g_reads[q] / n_read
                    elif slot < n or q < p.shared:  # the matching prompt, or the part both share
                        picks.append((row, a + q - g, slot, 1.0 / n_read))
                    else:  # the not-matching prompt's own tokens
                        picks.append((row, a + n_pos + q - p.shared, slot, 1.0 / n_read))
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        cache = copy.deepcopy(self.cache)
        cache.batch_repeat_interleave(n_rows)
        return reads + forward_reads(self.model, self.layers, ids, mask[:, None], positions, cache, picks, 2 * n)
