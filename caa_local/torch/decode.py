"""Greedy steered decoding in transformers, token by token with a KV cache: the baseline of
the ``decode_native_vs_transformers`` benchmark row (leaner than ``model.generate``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from caa_local.core.vector import ControlVector
from caa_local.torch.packed import cache_arg
from caa_local.torch.steer import steer


def steered_decode_rate(model: Any, tokens: Sequence[int], vector: ControlVector, layer: int, steer_from: int,
                        max_tokens: int, is_eog: Callable[[int], bool]) -> float:
    """Tokens/s of greedy single-token forward passes after ``tokens`` (prefill untimed),
    steered at ``layer`` from ``steer_from`` on, until ``max_tokens`` or an end token."""
    cache = DynamicCache()
    arg = cache_arg(model)
    with torch.inference_mode(), steer(model, vector, 1.0, [layer], from_position=steer_from):
        out = model(input_ids=torch.tensor([list(tokens)]), use_cache=True, **{arg: cache})
        next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        n, start = 0, time.perf_counter()
        while n < max_tokens and not is_eog(int(next_id)):
            n += 1
            out = model(input_ids=next_id, use_cache=True, **{arg: cache})
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
        return n / (time.perf_counter() - start)
