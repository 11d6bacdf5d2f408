"""Model and Engine: a loaded GGUF in the native extension, and contexts on it with live steering.

The public scripting API::

    from caa_local import ControlVector, Engine, Model
    engine = Engine()                                   # the default model, one context
    engine.steer("sentiment", ControlVector.load("vectors/sentiment.gguf"), 4.0)
    print(engine.generate([{"role": "user", "content": "How was your day?"}]).text)

    model = Model("m.gguf")                             # weights loaded once ...
    a, b = model.context(n_ctx=2048), model.context()   # ... several contexts on them

Steering follows the paper's position mask: every token before the end of the user's
instruction is decoded unsteered, the instruction's last token and everything after it
steered (``positions="all"`` steers every token, as llama.cpp's own CLI does). Positions are
chosen per call.

An Engine (one llama.cpp context: KV cache, steering, decode) is the only door to steering:
``steer``, ``unsteer``, ``set_steering`` and the scoped ``steered()``/``unsteered()``;
``engine.steering`` is a read-only snapshot. Contexts of one Model are independent and can
decode from different threads at once (the native decode loops release the GIL).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError, ModelLoadError, ModelMismatchError
from caa_local.core.locate import resolve_gguf
from caa_local.core.steering import Steering, SteeringTerm, check_multiplier
from caa_local.core.steering import make_term as _plain_term
from caa_local.core.templates import CHATML, ChatTemplate, Message, instruction_end
from caa_local.core.vector import ControlVector
from caa_local.engine import _native

if TYPE_CHECKING:
    from caa_local.engine.batch import Batch
    from caa_local.engine.scoring import ABScores, Choice, Setting

POSITIONS = ("response", "all")


class ContextFullError(CaaError):
    """The prompt does not fit in the context window."""


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    stop_reason: str  # eog | max_tokens | context | callback | stopped | interrupted
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


def check_positions(positions: str) -> str:
    if positions not in POSITIONS:
        raise CaaError(f"positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    return positions


def check_sizes(n_ctx: int, n_threads: int) -> None:
    if n_ctx < 16:
        raise CaaError(f"context size must be at least 16 tokens, got {n_ctx}")
    if n_threads < 0:
        raise CaaError(f"--threads must be positive (or 0 for all cores), got {n_threads}")


class Model:
    """A loaded GGUF: the weights, tokenizer, chat template and facts, shared by every context
    made on it (``model.context()``); load it once, open as many contexts as memory allows."""

    def __init__(self, path: str | Path | None = None, n_gpu_layers: int = 0) -> None:
        self.path = resolve_gguf(path)
        try:
            self.native = _native.Model(str(self.path), n_gpu_layers)
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{self.path}: {err}") from None
        self.n_embd: int = self.native.n_embd
        self.n_layer: int = self.native.n_layer
        self.n_vocab: int = self.native.n_vocab
        self.architecture: str = self.native.meta("general.architecture")
        self.name: str = self.native.meta("general.name") or self.path.stem
        self.template = ChatTemplate(self.native.meta("tokenizer.chat_template") or CHATML,
                                     self._special("tokenizer.ggml.bos_token_id"),
                                     self._special("tokenizer.ggml.eos_token_id"))
        self._steerable = False
        self._lock = threading.Lock()

    def _special(self, key: str) -> str:
        value = self.native.meta(key)
        if not value.isdigit() or int(value) >= self.n_vocab:
            return ""
        return self.native.token_to_piece(int(value), True).decode("utf-8", "replace")

    def context(self, n_ctx: int = 4096, n_threads: int = 0, n_batch: int = 512) -> Engine:
        """A new context (KV cache, steering, decode) on these weights; safe to use from
        another thread (the native decode loops release the GIL)."""
        return Engine(self, n_ctx, n_threads, n_batch=n_batch)

    def batch(self, n_seq: int, n_ctx: int = 4096, n_threads: int = 0, n_batch: int = 512) -> Batch:
        """A context holding ``n_seq`` sequences of ``n_ctx`` tokens each, decoded together
        (continuous batching, a steering per sequence): see ``caa_local.engine.batch``."""
        from caa_local.engine.batch import Batch

        return Batch(self, n_seq, n_ctx, n_threads, n_batch)

    def meta(self, key: str) -> str:
        """The GGUF metadata value for ``key`` as a string, '' when absent."""
        return self.native.meta(key)

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
            probe_session = _native.Session(self.native, 64, 0, 64)
            probe = np.zeros((self.n_layer - 1, self.n_embd), np.float32)
            probe[:] = np.random.default_rng(0).standard_normal(self.n_embd).astype(np.float32) * 50
            tokens = self.tokenize("Hello")[:4] or [0]
            before = probe_session.logits_after(tokens, len(tokens))
            probe_session.set_steering(probe, 1, self.n_layer - 1)
            after = probe_session.logits_after(tokens, 0)
            if np.array_equal(before, after):
                raise ModelMismatchError(
                    f"{self.path.name}: architecture {self.architecture!r} ignores control "
                    "vectors in llama.cpp; steering it would silently do nothing"
                )
            self._steerable = True


class Engine:
    """One context on a loaded model; steering can change between any two tokens."""

    def __init__(
        self,
        model: str | Path | Model | None = None,
        n_ctx: int = 4096,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
    ) -> None:
        """A context on ``model``: a loaded ``Model`` (shared, no second load), or a GGUF path
        or name to load (None: the default model)."""
        check_sizes(n_ctx, n_threads)
        self._model = model if isinstance(model, Model) else Model(model, n_gpu_layers)
        try:
            self._session = _native.Session(self._model.native, n_ctx, n_threads, n_batch)
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{self._model.path}: {err}") from None
        self._steering = Steering()
        self._template: ChatTemplate | None = None  # this context's choice (--chat-template, --format base)
        self._n_threads_asked = n_threads
        self._n_batch = n_batch

    @property
    def model(self) -> Model:
        """The loaded weights this context runs on (shared by every context made from it)."""
        return self._model

    def new_context(self, n_ctx: int | None = None) -> Engine:
        """Another context on the same loaded model (alias of ``model.context``), with this
        one's threads and batch size, its own KV cache and no steering."""
        return Engine(self._model, self.n_ctx if n_ctx is None else n_ctx, self._n_threads_asked,
                      n_batch=self._n_batch)

    # -- facts ------------------------------------------------------------------------------
    @property
    def model_path(self) -> Path:
        return self._model.path

    @property
    def model_name(self) -> str:
        return self._model.name

    @property
    def architecture(self) -> str:
        return self._model.architecture

    @property
    def n_embd(self) -> int:
        return self._model.n_embd

    @property
    def n_layer(self) -> int:
        return self._model.n_layer

    @property
    def n_vocab(self) -> int:
        return self._model.n_vocab

    @property
    def n_ctx(self) -> int:
        return int(self._session.n_ctx)

    @property
    def n_threads(self) -> int:
        """Threads llama.cpp runs with (0 asked: every hardware thread)."""
        return int(self._session.n_threads)

    @property
    def template(self) -> ChatTemplate:
        return self._template or self._model.template

    @template.setter
    def template(self, template: ChatTemplate) -> None:
        """Use another template in this context (core.templates.resolve_template chooses it)."""
        self._template = template

    def meta(self, key: str) -> str:
        """The model's GGUF metadata value for ``key`` as a string, '' when absent."""
        return self._model.meta(key)

    # -- text -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of ``tokens``; ``special`` renders control tokens (e.g. <|im_start|>) too."""
        return self._model.detokenize(tokens, special)

    def is_eog(self, token: int) -> bool:
        return self._model.is_eog(token)

    def prompt(self, messages: Sequence[Message], suffix: str = "",
               positions: str = "response") -> tuple[list[int], int]:
        """Tokens of the chat-templated prompt (+ suffix) and where steering starts."""
        check_positions(positions)
        text = self.template.render(messages, add_generation_prompt=True)
        prompt_tokens = self.tokenize(text)
        # The suffix (an answer's "(A", a judge's "Score:") joins the prompt as the template
        # joins an assistant message: Llama-2's "[/INST] (A", ChatML's "assistant\n(A".
        tokens = self.tokenize(self.template.render_answer(messages, suffix)) if suffix else prompt_tokens
        steer_from = 0 if positions == "all" else instruction_end(prompt_tokens, tokens)
        return tokens, steer_from

    # -- steering ---------------------------------------------------------------------------
    @property
    def steering(self) -> Steering:
        """The current steering: an immutable snapshot (change it through Engine methods)."""
        return self._steering

    def make_term(self, name: str, vector: ControlVector, scale: float,
                  layers: Sequence[int] | None = None, any_arch: bool = False) -> SteeringTerm:
        """A term checked once against this model: shapes and layers always, the vector's
        architecture hint unless ``any_arch``."""
        vector.check_fits(self.n_embd, self.n_layer, name)
        if vector.model_hint != self.architecture and not any_arch:
            raise ModelMismatchError(
                f"{name}: made for a {vector.model_hint!r} model, this one is "
                f"{self.architecture!r} (use --any-arch if the shapes are meant to match)"
            )
        term = _plain_term(name, vector, scale, layers)
        return SteeringTerm(term.name, term.vector, term.scale, term.layers,
                            checked_for=(self.n_embd, self.n_layer))

    def _checked(self, term: SteeringTerm) -> SteeringTerm:
        if term.checked_for == (self.n_embd, self.n_layer):
            check_multiplier(term.scale)
            return term
        return self.make_term(term.name, term.vector, term.scale, term.layers, any_arch=True)

    def steer(self, name: str, vector: ControlVector, scale: float,
              layers: Sequence[int] | None = None, any_arch: bool = False) -> SteeringTerm:
        """Add (or replace) the term ``name``; it applies from the next decoded token."""
        term = self.make_term(name, vector, scale, layers, any_arch)
        self._install(self._steering.with_term(term))
        return term

    def unsteer(self, name: str | None = None) -> None:
        """Remove the term ``name``, or every term."""
        self._install(Steering() if name is None else self._steering.without(name))

    def set_steering(self, terms: Sequence[SteeringTerm]) -> None:
        """Replace all steering at once (all or nothing)."""
        self._install(Steering(self._checked(t) for t in terms))

    @contextlib.contextmanager
    def steered(self, terms: Sequence[SteeringTerm]) -> Iterator[Engine]:
        """Steer with exactly ``terms`` inside the block; the previous steering comes back after."""
        saved = self._steering
        self.set_steering(terms)
        try:
            yield self
        finally:
            self._install(saved)

    def unsteered(self) -> contextlib.AbstractContextManager[Engine]:
        return self.steered(())

    def _install(self, steering: Steering) -> None:
        """Hand the composed buffer to llama.cpp; it applies from the next decoded token."""
        packed = steering.buffer(self.n_embd, self.n_layer)
        if packed is None:
            self._session.clear_steering()
        else:
            self.require_steerable()
            self._session.set_steering(*packed)
        self._steering = steering

    def require_steerable(self) -> None:
        """Refuse a model whose architecture ignores control vectors (see ``Model``)."""
        self._model.require_steerable()

    # -- generation -------------------------------------------------------------------------
    def _feed(self, tokens: list[int], steer_from: int, headroom: int,
              should_stop: Callable[[], bool] | None) -> tuple[int, bool]:
        """Bring the KV cache to ``tokens``: positions before ``steer_from`` unsteered, the
        rest with the current steering. Reuses the longest cached prefix decoded exactly so.

        Returns (tokens reused, whether should_stop ended it early).
        """
        session = self._session
        if len(tokens) + max(headroom, 1) > session.n_ctx:
            raise ContextFullError(
                f"prompt of {len(tokens)} tokens + {headroom} to generate does not fit "
                f"the context of {session.n_ctx} tokens (use --ctx to enlarge it)"
            )
        # The last token is always decoded again: its logits start the answer.
        keep = min(session.reusable(tokens, steer_from), len(tokens) - 1)
        session.truncate(keep)
        try:
            done = (session.decode(tokens[keep:steer_from], False, should_stop)
                    and session.decode(tokens[max(keep, steer_from):], True, should_stop))
        except _native.ContextFullError as err:
            raise ContextFullError(str(err)) from None
        return keep, not done

    def generate(
        self,
        messages: Sequence[Message],
        sampling: Sampling = Sampling(),
        on_piece: Callable[[str], bool | None] | None = None,
        suffix: str = "",
        positions: str = "response",
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Answer the last user message; pieces stream to ``on_piece`` as they come.

        ``on_piece`` returning False ends the answer (stop_reason 'callback');
        ``should_stop()`` is polled between prompt batches and tokens (True: 'stopped').
        Ctrl-C stops the answer: the result then has stop_reason 'interrupted' and keeps the
        text generated so far (the caller decides whether to keep it).
        """
        tokens, steer_from = self.prompt(messages, suffix, positions)
        return self.generate_tokens(tokens, steer_from, sampling, on_piece, should_stop)

    def generate_tokens(
        self,
        tokens: Sequence[int],
        steer_from: int,
        sampling: Sampling = Sampling(),
        on_piece: Callable[[str], bool | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """``generate`` from a prompt already rendered and tokenized (``prompt()``): positions
        before ``steer_from`` are decoded unsteered, the rest with the current steering."""
        if sampling.max_tokens < 1:
            raise CaaError(f"max tokens must be at least 1, got {sampling.max_tokens}")
        if not tokens:
            raise CaaError("the prompt is empty")
        if not 0 <= steer_from <= len(tokens):
            raise CaaError(f"steer_from {steer_from} is outside the prompt of {len(tokens)} tokens")
        tokens = list(tokens)
        session = self._session
        max_tokens = min(sampling.max_tokens, session.n_ctx)  # the context bounds any answer
        steering = self._steering.to_dict()
        start = time.perf_counter()
        reused, stopped = self._feed(tokens, steer_from, min(max_tokens, 16), should_stop)
        prompt_seconds = time.perf_counter() - start
        if stopped:
            return GenerationResult("", [], "stopped", len(tokens), reused, prompt_seconds, 0.0, steering)
        pieces: list[str] = []

        def collect(piece: str) -> bool:
            pieces.append(piece)
            return on_piece(piece) is not False if on_piece else True

        params = _native.SamplingParams(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            min_p=sampling.min_p, repeat_penalty=sampling.repeat_penalty, repeat_last_n=64,
            seed=sampling.seed & 0xFFFFFFFF,
        )
        start = time.perf_counter()
        n_before = len(session.tokens)
        try:
            out, reason = session.generate(max_tokens, params, collect, should_stop)
        except KeyboardInterrupt:
            out, reason = list(session.tokens[n_before:]), "interrupted"
        return GenerationResult(
            text="".join(pieces), tokens=list(out), stop_reason=reason,
            n_prompt_tokens=len(tokens), n_reused_tokens=reused,
            prompt_seconds=prompt_seconds, decode_seconds=time.perf_counter() - start,
            steering=steering,
        )

    def reset(self) -> None:
        """Forget the KV cache (the next call decodes its prompt in full)."""
        self._session.truncate(0)

    def extend(self, tokens: Sequence[int], steered: bool = True) -> None:
        """Decode ``tokens`` after the cached ones, with the current steering or none (for
        benchmarks and tools that drive the cache token by token)."""
        try:
            self._session.decode(list(tokens), steered)
        except _native.ContextFullError as err:
            raise ContextFullError(str(err)) from None

    # -- scoring ----------------------------------------------------------------------------
    def score_ab(self, choices: Sequence[Choice], settings: Sequence[Setting | Sequence[SteeringTerm]],
                 positions: str = "response", progress: Callable[[int], None] | None = None) -> list[ABScores]:
        """A/B scores of every choice under every setting (one ABScores per setting), batched:
        with the response mask each question's unsteered prefix is decoded once."""
        from caa_local.engine import scoring

        return scoring.score_ab(self, choices, settings, positions, progress)

    def perplexity(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str]) -> list[float]:
        """The unsteered model's perplexity of each answer after its chat prompt (NaN if empty)."""
        from caa_local.engine import scoring

        return scoring.perplexity(self, prompts, answers)

    # -- checks (tests, parity, benchmarks) -------------------------------------------------
    def layer_outputs(self, tokens: Sequence[int], steer_from: int) -> npt.NDArray[np.float32]:
        """Output of every block (row N = llama.cpp's l_out-N) at the last of ``tokens``, decoded
        in a fresh context: positions < steer_from unsteered, the rest with the current steering."""
        return self._session.layer_outputs(list(tokens), steer_from)

    def logits_after(self, tokens: Sequence[int], steer_from: int) -> npt.NDArray[np.float32]:
        """Next-token logits after ``tokens``, decoded as ``layer_outputs`` does."""
        return self._session.logits_after(list(tokens), steer_from)

    def cached_tokens(self) -> list[int]:
        """The tokens whose keys and values are in this context's KV cache, in order."""
        return list(self._session.tokens)

    def perf_counts(self) -> dict[str, int]:
        """llama.cpp's own counters for this context: prompt tokens decoded in batches, single
        tokens decoded, and how often it reused its compute graph instead of rebuilding it."""
        n_prompt, n_single, n_reused = self._session.perf_counts
        return {"prompt_tokens": n_prompt, "single_decodes": n_single, "graphs_reused": n_reused}
