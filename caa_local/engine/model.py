"""Model: a loaded GGUF in the native extension (weights, tokenizer, chat template, facts),
shared by every context made on it (``model.context()``, a ``caa_local.engine.engine.Engine``)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError, ModelLoadError, ModelMismatchError
from caa_local.core.locate import resolve_gguf
from caa_local.core.templates import ChatTemplate, resolve_template
from caa_local.engine import _native
from caa_local.engine.rpc import connect as rpc_connect
from caa_local.engine.threads import ThreadPerCall

if TYPE_CHECKING:
    from caa_local.engine.engine import Engine

# --flash-attn: llama.cpp's choice per device ("auto": on for the CPU), or on or off for every context.
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}


class Model:
    """A loaded GGUF: the weights, tokenizer, chat template and facts, shared by every context
    made on it (``model.context()``); load it once, open as many contexts as memory allows."""

    def __init__(self, path: str | Path | None = None, n_gpu_layers: int = 0, rpc: Sequence[str] = (),
                 flash_attn: str = "auto") -> None:
        """``rpc``: host:port of llama.cpp RPC workers; ``n_gpu_layers`` offloads to them first;
        ``flash_attn`` (auto, on, off) holds for every context on the model (``FLASH_ATTN``)."""
        if flash_attn not in FLASH_ATTN:
            raise CaaError(f"flash attention must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
        self.path = resolve_gguf(path)
        self.rpc = rpc_connect(rpc)
        try:
            self.native = _native.Model(str(self.path), n_gpu_layers, self.rpc, FLASH_ATTN[flash_attn])
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{self.path}: {err}") from None
        self.n_embd: int = self.native.n_embd
        self.n_layer: int = self.native.n_layer
        self.n_vocab: int = self.native.n_vocab
        self.flash_attn = flash_attn
        self.architecture: str = self.native.meta("general.architecture")
        self.name: str = self.native.meta("general.name") or self.path.stem
        self.bos_token = self._special("tokenizer.ggml.bos_token_id")
        self.eos_token = self._special("tokenizer.ggml.eos_token_id")
        self._template: ChatTemplate | None = None
        self._steerable = False
        self._lock = threading.Lock()

    def _special(self, key: str) -> str:
        value = self.native.meta(key)
        if not value.isdigit() or int(value) >= self.n_vocab:
            return ""
        return self.native.token_to_piece(int(value), True).decode("utf-8", "replace")

    def chat_template(self, spec: str | None = None, fmt: str = "chat") -> ChatTemplate:
        """The template prompts are rendered with: ``--chat-template NAME|FILE`` (``spec``), the
        paper's base format (``fmt="base"``), else the GGUF's own. A GGUF without one is refused
        with the ways out, never rendered in a guessed format (core.templates.resolve_template)."""
        if spec is None and fmt == "chat" and self._template is not None:
            return self._template
        template = resolve_template(self.meta("tokenizer.chat_template"), spec, fmt, self.bos_token,
                                    self.eos_token, self.path.name)
        if spec is None and fmt == "chat":
            self._template = template
        return template

    @property
    def template(self) -> ChatTemplate:
        """The GGUF's own chat template (an error naming --chat-template when it has none)."""
        return self.chat_template()

    def context(self, n_ctx: int = 4096, n_threads: int = 0, n_batch: int = 512) -> Engine:
        """A new context (KV cache, steering, decode) on these weights; safe to use from
        another thread (the native decode loops release the GIL)."""
        from caa_local.engine.engine import Engine  # each needs the other: an Engine holds its Model

        return Engine(self, n_ctx, n_threads, n_batch=n_batch)

    def meta(self, key: str) -> str:
        """The GGUF metadata value for ``key`` as a string, '' when absent."""
        return self.native.meta(key)

    @functools.cached_property
    def kv_bytes_per_token(self) -> int:
        """KV cache one token takes in a context: K and V in f16 at every layer, with the KV
        heads and head sizes the GGUF declares (all heads where it declares none, or per layer)."""
        def number(key: str, default: int) -> int:
            value = self.meta(f"{self.architecture}.attention.{key}")
            return int(value) if value.isdigit() else default

        n_head = max(number("head_count", 1), 1)
        k_dim = number("key_length", self.n_embd // n_head)
        return self.n_layer * number("head_count_kv", n_head) * (k_dim + number("value_length", k_dim)) * 2

    def kv_stream_bytes(self, n_tokens: int) -> int:
        """KV cache of one sequence's stream holding ``n_tokens`` (llama.cpp pads it to 256 cells)."""
        return -(-n_tokens // 256) * 256 * self.kv_bytes_per_token

    def tokenize(self, text: str) -> list[int]:
        # Templates render BOS themselves, as transformers' apply_chat_template does.
        return self.native.tokenize(text, False, True)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of ``tokens``; ``special`` renders control tokens (e.g. <|im_start|>) too."""
        return self.native.detokenize(list(tokens), special)

    def is_eog(self, token: int) -> bool:
        return bool(self.native.is_eog(token))

    def require_steerable(self) -> None:
        """Refuse an architecture that builds no control-vector op (llama.cpp would silently
        ignore every vector); probed once per model."""
        with self._lock:
            if self._steerable:
                return

            def probe() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
                session = _native.Session(self.native, 64, 0, 64)
                direction = np.random.default_rng(0).standard_normal(self.n_embd).astype(np.float32) * 50
                tokens = self.tokenize("Hello")[:4] or [0]
                before = session.logits_after(tokens, len(tokens))
                session.set_steering(np.tile(direction, (self.n_layer - 1, 1)), 1, self.n_layer - 1)
                return before, session.logits_after(tokens, 0)

            # One-off work: on a thread that ends with it, so that it leaves no OpenMP team on the
            # caller's thread (engine/threads.py).
            logits = ThreadPerCall("caa-steerable-probe").submit(probe).result()
            if np.array_equal(*logits):
                raise ModelMismatchError(
                    f"{self.path.name}: architecture {self.architecture!r} ignores control "
                    "vectors in llama.cpp; steering it would silently do nothing"
                )
            self._steerable = True
