"""Condition prompts read with transformers (the reference backend): each prompt's block
outputs (forward hooks, torch/extract.py ``block_reads``) averaged over its user message."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from caa_local.core.condition import span_read
from caa_local.core.templates import ChatTemplate
from caa_local.torch.extract import block_reads


def encode_prompts(tokenizer: Any, template: ChatTemplate, prompts: Sequence[str]) -> list[tuple[list[int], int]]:
    """(tokens up to the end of the user message, tokens in the message) per prompt."""
    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return [span_read(template, tokenize, p) for p in prompts]


def token_reads(model: Any, encoded: Sequence[tuple[Sequence[int], int]], layers: Sequence[int],
                batch_size: int = 8, pad_id: int = 0) -> npt.NDArray[np.float32]:
    """(n, len(layers), n_embd) reads of prompts already tokenized (``encode_prompts``)."""
    out = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        out.append(block_reads(model, [list(s) for s, _ in chunk], [n for _, n in chunk], layers,
                               read="answer-mean", pad_id=pad_id))
    return np.concatenate(out).astype(np.float32)


def prompt_reads(model: Any, tokenizer: Any, template: ChatTemplate, prompts: Sequence[str],
                 layers: Sequence[int], batch_size: int = 8) -> npt.NDArray[np.float32]:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return token_reads(model, encode_prompts(tokenizer, template, prompts), layers, batch_size, pad_id)
