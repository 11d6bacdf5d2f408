"""Engine: a loaded GGUF model in the native extension, with live steering and chat templates.

The public scripting API::

    from caa_local import Engine, ControlVector
    engine = Engine()                                   # the default model
    engine.steer("sentiment", ControlVector.load("vectors/sentiment.gguf"), 4.0)
    print(engine.generate([{"role": "user", "content": "How was your day?"}]).text)

Steering follows the paper's position mask: every token before the end of the user's
instruction is decoded unsteered, the instruction's last token and everything after it
steered (``positions="all"`` steers every token, as llama.cpp's own CLI does).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caa_local.engine import _native
from caa_local.core.errors import CaaError, ModelLoadError, ModelMismatchError
from caa_local.core.locate import resolve_gguf
from caa_local.core.steering import Steering, SteeringTerm
from caa_local.core.templates import CHATML, ChatTemplate, Message, instruction_end, shared_prefix
from caa_local.core.vector import ControlVector

POSITIONS = ("response", "all")


class ContextFullError(CaaError):
    """The prompt does not fit in the context window."""


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stop_reason: str  # eog | max_tokens | context | callback | interrupted
    n_prompt_tokens: int
    n_reused_tokens: int
    prompt_seconds: float
    decode_seconds: float
    steering: list[dict[str, object]] = field(default_factory=list)

    @property
    def decode_tokens_per_second(self) -> float:
        return len(self.tokens) / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 0
    max_tokens: int = 256


class Engine:
    """One model and its context; steering can change between any two tokens."""

    def __init__(
        self,
        model: str | Path | None = None,
        n_ctx: int = 4096,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        positions: str = "response",
    ) -> None:
        if positions not in POSITIONS:
            raise CaaError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
        if n_ctx < 16:
            raise CaaError(f"context size must be at least 16 tokens, got {n_ctx}")
        if n_threads < 0:
            raise CaaError(f"--threads must be positive (or 0 for all cores), got {n_threads}")
        self.model_path = resolve_gguf(model)
        try:
            self.session = _native.Session(str(self.model_path), n_ctx, n_threads, n_gpu_layers, n_batch)
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{self.model_path}: {err}") from None
        self.positions = positions
        self.n_embd: int = self.session.n_embd
        self.n_layer: int = self.session.n_layer
        self.architecture: str = self.session.meta("general.architecture")
        self.model_name: str = self.session.meta("general.name") or self.model_path.stem
        self.template = self._load_template()
        self.steering = Steering()
        self._cvec_checked = False

    # -- text -------------------------------------------------------------------------------
    def _special(self, key: str) -> str:
        value = self.session.meta(key)
        if not value.isdigit() or int(value) >= self.session.n_vocab:
            return ""
        return self.session.token_to_piece(int(value), True).decode("utf-8", "replace")

    def _load_template(self) -> ChatTemplate:
        source = self.session.meta("tokenizer.chat_template") or CHATML
        return ChatTemplate(source, self._special("tokenizer.ggml.bos_token_id"),
                            self._special("tokenizer.ggml.eos_token_id"))

    def tokenize(self, text: str) -> list[int]:
        # Templates render BOS themselves, as transformers' apply_chat_template does.
        return self.session.tokenize(text, False, True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.session.detokenize(list(tokens), False)

    def prompt(self, messages: Sequence[Message], suffix: str = "") -> tuple[list[int], int]:
        """Tokens of the chat-templated prompt (+ suffix) and where steering starts."""
        text = self.template.render(messages, add_generation_prompt=True)
        prompt_tokens = self.tokenize(text)
        tokens = self.tokenize(text + suffix) if suffix else prompt_tokens
        steer_from = 0 if self.positions == "all" else instruction_end(prompt_tokens, tokens)
        return tokens, steer_from

    # -- steering ---------------------------------------------------------------------------
    def check_vector(self, vector: ControlVector, where: str, force: bool = False) -> None:
        """Shape errors always; a model-hint mismatch only without ``force``."""
        vector.check_fits(self.n_embd, self.n_layer, where)
        if vector.model_hint != self.architecture and not force:
            raise ModelMismatchError(
                f"{where}: made for a {vector.model_hint!r} model, this one is "
                f"{self.architecture!r} (use --force if the shapes are meant to match)"
            )

    def steer(self, name: str, vector: ControlVector, scale: float,
              layers: Sequence[int] | None = None, force: bool = False) -> SteeringTerm:
        self.check_vector(vector, name, force)
        term = self.steering.set(name, vector, scale, tuple(layers) if layers else None)
        self.apply_steering()
        return term

    def unsteer(self, name: str | None = None) -> None:
        if name is None:
            self.steering.clear()
        else:
            self.steering.remove(name)
        self.apply_steering()

    def apply_steering(self) -> None:
        """Hand the composed buffer to llama.cpp; it applies from the next decoded token."""
        packed = self.steering.buffer(self.n_embd, self.n_layer)
        if packed is None:
            self.session.clear_steering()
            return
        self._check_architecture_steers()
        buf, il_start, il_end = packed
        self.session.set_steering(buf, il_start, il_end)

    def _check_architecture_steers(self) -> None:
        """Some architectures build no control-vector op and ignore vectors: refuse them."""
        if self._cvec_checked:
            return
        probe = np.zeros((self.n_layer - 1, self.n_embd), np.float32)
        probe[:] = np.random.default_rng(0).standard_normal(self.n_embd).astype(np.float32) * 50
        tokens = self.tokenize("Hello")[:4] or [0]
        before = self.session.logits_after(tokens, len(tokens))
        saved = self.steering.buffer(self.n_embd, self.n_layer)
        self.session.set_steering(probe, 1, self.n_layer - 1)
        after = self.session.logits_after(tokens, 0)
        self.session.clear_steering()
        if np.array_equal(before, after):
            raise ModelMismatchError(
                f"{self.model_path.name}: architecture {self.architecture!r} ignores control "
                "vectors in llama.cpp; steering it would silently do nothing"
            )
        if saved is not None:
            self.session.set_steering(*saved)
        self._cvec_checked = True

    @contextlib.contextmanager
    def unsteered(self) -> Iterator[None]:
        self.session.clear_steering()
        try:
            yield
        finally:
            self.apply_steering()

    # -- generation -------------------------------------------------------------------------
    def _feed(self, tokens: list[int], steer_from: int, headroom: int) -> int:
        """Bring the KV cache to ``tokens``, reusing the longest cached prefix.

        The steered part (from ``steer_from``) is always decoded anew with the current
        steering. Returns how many tokens were reused.
        """
        if len(tokens) + max(headroom, 1) > self.session.n_ctx:
            raise ContextFullError(
                f"prompt of {len(tokens)} tokens + {headroom} to generate does not fit "
                f"the context of {self.session.n_ctx} tokens (use --ctx to enlarge it)"
            )
        keep = min(shared_prefix(self.session.tokens, tokens), steer_from, len(tokens) - 1)
        self.session.truncate(keep)
        try:
            self.session.decode(tokens[keep:steer_from], False)
            self.session.decode(tokens[max(keep, steer_from):], True)
        except _native.ContextFullError as err:
            raise ContextFullError(str(err)) from None
        return keep

    def generate(
        self,
        messages: Sequence[Message],
        sampling: Sampling = Sampling(),
        on_piece: Callable[[str], bool | None] | None = None,
        suffix: str = "",
    ) -> GenerationResult:
        """Answer the last user message; pieces stream to ``on_piece`` as they come.

        Ctrl-C stops the answer: the result then has stop_reason 'interrupted' and keeps
        the text generated so far (the caller decides whether to keep it).
        """
        if sampling.max_tokens < 1:
            raise CaaError(f"max tokens must be at least 1, got {sampling.max_tokens}")
        max_tokens = min(sampling.max_tokens, self.session.n_ctx)  # the context bounds any answer
        tokens, steer_from = self.prompt(messages, suffix)
        start = time.perf_counter()
        reused = self._feed(tokens, steer_from, min(max_tokens, 16))
        prompt_seconds = time.perf_counter() - start
        pieces: list[str] = []

        def collect(piece: str) -> bool:
            pieces.append(piece)
            return on_piece(piece) is not False if on_piece else True

        start = time.perf_counter()
        n_before = len(self.session.tokens)
        try:
            out, reason = self.session.generate(
                max_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                sampling.min_p, sampling.repeat_penalty, 64, sampling.seed & 0xFFFFFFFF, collect,
            )
        except KeyboardInterrupt:
            out, reason = list(self.session.tokens[n_before:]), "interrupted"
        return GenerationResult(
            text="".join(pieces), tokens=list(out), stop_reason=reason,
            n_prompt_tokens=len(tokens), n_reused_tokens=reused,
            prompt_seconds=prompt_seconds, decode_seconds=time.perf_counter() - start,
            steering=self.steering.to_dict(),
        )

    def reset(self) -> None:
        self.session.truncate(0)
