"""Engine: a context on a loaded GGUF (``caa_local.engine.model.Model``), with live steering.

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

Prompts go through the GGUF's own chat template; one without a template is refused until a
context chooses one (``use_template("llama2")``, the CLI's ``--chat-template``). Batched A/B
scoring and block-output reads live beside the engine (``caa_local.engine.scoring``,
``caa_local.engine.reads``) and reach llama.cpp through ``scorer()`` and ``reader()``.
"""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from caa_local.core.condition import Condition, make_condition
from caa_local.core.gating import ConditionCheck, make_check
from caa_local.core.errors import CaaError, ModelLoadError, ModelMismatchError
from caa_local.core.positions import check_positions
from caa_local.core.steering import Steering, SteeringTerm
from caa_local.core.steering import make_term as _plain_term
from caa_local.core.templates import ChatTemplate, Message, instruction_end
from caa_local.core.vector import ControlVector
from caa_local.engine import _native
from caa_local.engine.model import Model


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
    conditions: list[dict[str, object]] = field(default_factory=list)  # per condition checked: score, fired

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


# KV each context keeps of the scorers it made, most recent first: a question set scored again
# in the same chunks (calibration re-scores its validation questions after the layer sweep)
# reuses their decoded prefixes instead of decoding them again.
KEPT_SCORER_BYTES = 512 << 20

# The chat's sampling (REPL, generate, the coherence checks of calibration and evaluation).
CHAT_SAMPLING = Sampling(temperature=0.7, top_p=0.95, repeat_penalty=1.1, seed=0, max_tokens=256)


def check_sizes(n_ctx: int, n_threads: int) -> None:
    if n_ctx < 16:
        raise CaaError(f"context size must be at least 16 tokens, got {n_ctx}")
    if n_threads < 0:
        raise CaaError(f"--threads must be positive (or 0 for all cores), got {n_threads}")


class Engine:
    """One context on a loaded model; steering can change between any two tokens."""

    def __init__(
        self,
        model: str | Path | Model | None = None,
        n_ctx: int = 4096,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        n_batch: int = 512,
        rpc: Sequence[str] = (),
        flash_attn: str = "auto",
    ) -> None:
        """A context on ``model``: a loaded ``Model`` (shared, no second load), or a GGUF path
        or name to load (None: the default model) with ``n_gpu_layers``, ``rpc`` and
        ``flash_attn`` as ``Model`` takes them."""
        check_sizes(n_ctx, n_threads)
        self._model = model if isinstance(model, Model) else Model(model, n_gpu_layers, rpc, flash_attn)
        try:
            self._session = _native.Session(self._model.native, n_ctx, n_threads, n_batch)
        except (ValueError, RuntimeError) as err:
            raise ModelLoadError(f"{self._model.path}: {err}") from None
        self._steering = Steering()
        self._template: ChatTemplate | None = None  # this context's choice (--chat-template, --format base)
        self._n_threads_asked = n_threads
        self._n_batch = n_batch
        self._probe: _native.RowProbe | None = None  # reads block outputs for conditions (core/condition.py)
        self._scorers: OrderedDict[tuple[int, tuple[tuple[int, ...], ...]], _native.Scorer] = OrderedDict()

    @property
    def model(self) -> Model:
        """The loaded weights this context runs on (shared by every context made from it)."""
        return self._model

    def new_context(self, n_ctx: int | None = None) -> Engine:
        """Another context on the same loaded model (alias of ``model.context``), with this
        one's threads, batch size and chat template, its own KV cache and no steering."""
        context = Engine(self._model, self.n_ctx if n_ctx is None else n_ctx, self._n_threads_asked,
                         n_batch=self._n_batch)
        if self._template is not None:
            context.template = self._template
        return context

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
        """Use another template in this context (``use_template`` chooses one by name)."""
        self._template = template

    def use_template(self, spec: str | None = None, fmt: str = "chat") -> ChatTemplate:
        """Render this context's prompts with ``--chat-template``/``--format``'s choice (see
        ``Model.chat_template``); raises, naming the options, for a GGUF without a template."""
        self._template = self._model.chat_template(spec, fmt)
        return self._template

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
        """A term checked against this model: shapes and layers always, the vector's
        architecture hint unless ``any_arch`` (the hint is checked here only: a term made with
        ``any_arch`` stays accepted wherever it goes, e.g. as a scoring setting)."""
        vector.check_fits(self.n_embd, self.n_layer, name)
        if vector.model_hint != self.architecture and not any_arch:
            raise ModelMismatchError(
                f"{name}: made for a {vector.model_hint!r} model, this one is "
                f"{self.architecture!r} (use --any-arch if the shapes are meant to match)"
            )
        return _plain_term(name, vector, scale, layers)

    def make_condition(self, name: str, vector: ControlVector, threshold: float | None = None,
                       invert: bool = False, any_arch: bool = False) -> Condition:
        """A condition (a calibrated ``caa.kind = condition`` file) checked against this model;
        ``threshold`` overrides the calibrated one. Terms carry it with ``with_conditions``."""
        return make_condition(name, vector, self.n_embd, self.n_layer, self.architecture, threshold, invert, any_arch)

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
        """Replace all steering at once (all or nothing: every term is checked against this
        model before any applies)."""
        self._install(Steering(terms))

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
    def _watch(self, layers: Sequence[int]) -> _native.RowProbe:
        """The probe reading ``layers`` while decoding; the first one (or one more layer) rebuilds
        the context with llama.cpp's eval callback, so contexts without conditions never carry it."""
        if self._probe is None or not set(layers) <= set(self._probe.layers):
            wanted = sorted(set(layers) | set(self._probe.layers if self._probe else ()))
            try:
                self._probe = _native.RowProbe.attach(self._session, wanted)
            except ValueError as err:
                raise CaaError(f"condition layers: {err}") from None
        return self._probe

    def _feed(self, tokens: list[int], steer_from: int, headroom: int,
              should_stop: Callable[[], bool] | None,
              check: ConditionCheck | None = None) -> tuple[int, bool, list[dict[str, object]]]:
        """Bring the KV cache to ``tokens``: positions before ``steer_from`` unsteered, the
        rest with the current steering. Reuses the longest cached prefix decoded exactly so.
        With ``check``, its span is read while the unsteered part decodes, and the terms its
        conditions pick join the steering before the first steered token.

        Returns (tokens reused, whether should_stop ended it early, the conditions' report).
        """
        session = self._session
        probe = self._watch(check.layers) if check is not None else None
        if len(tokens) + max(headroom, 1) > session.n_ctx:
            raise ContextFullError(
                f"prompt of {len(tokens)} tokens + {headroom} to generate does not fit "
                f"the context of {session.n_ctx} tokens (use --ctx to enlarge it)"
            )
        # The last token is always decoded again: its logits start the answer.
        keep = min(session.reusable(tokens, steer_from), len(tokens) - 1)
        if check is not None:
            keep = min(keep, check.span[0])  # the span is read as it decodes
        session.truncate(keep)
        report: list[dict[str, object]] = []
        try:
            if probe is not None and check is not None:
                probe.arm(check.span[0] - keep, check.span[1] - keep)
                try:
                    done = session.decode(tokens[keep:steer_from], False, should_stop)
                finally:
                    probe.disarm()  # an idle probe leaves the graph unsplit
                if done:
                    terms, report = check.decide(dict(zip(probe.layers, probe.means())))
                    self._install(Steering([*self._steering.terms, *terms]))
            else:
                done = session.decode(tokens[keep:steer_from], False, should_stop)
            done = done and session.decode(tokens[max(keep, steer_from):], True, should_stop)
        except _native.ContextFullError as err:
            raise ContextFullError(str(err)) from None
        return keep, not done, report

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
        text generated so far (the caller decides whether to keep it). Terms with conditions
        apply only when one fires on the last user message (``result.conditions`` says).
        """
        tokens, steer_from = self.prompt(messages, suffix, positions)
        check = self.condition_check(messages, tokens, steer_from)
        return self.generate_tokens(tokens, steer_from, sampling, on_piece, should_stop, check)

    def condition_check(self, messages: Sequence[Message], tokens: Sequence[int], steer_from: int,
                        terms: Sequence[SteeringTerm] | None = None) -> ConditionCheck | None:
        """What the terms with conditions (of ``terms``; default: the current steering) need to
        decide on this prompt (its tokens from ``prompt(messages)``); None when no term waits."""
        waiting = [t for t in (self._steering.terms if terms is None else terms) if t.conditions]
        return make_check(self.template, self.tokenize, messages, tokens, steer_from, waiting) if waiting else None

    def generate_tokens(
        self,
        tokens: Sequence[int],
        steer_from: int,
        sampling: Sampling = Sampling(),
        on_piece: Callable[[str], bool | None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        check: ConditionCheck | None = None,
    ) -> GenerationResult:
        """``generate`` from a prompt already rendered and tokenized (``prompt()``): positions
        before ``steer_from`` are decoded unsteered, the rest with the current steering, plus
        the terms of ``check`` whose conditions fire on this prompt (for this answer only)."""
        if check is None:
            if self._steering.conditional:
                raise CaaError("the steering has terms with conditions: pass "
                               "check=engine.condition_check(messages, tokens, steer_from)")
            return self._generate_tokens(tokens, steer_from, sampling, on_piece, should_stop)
        saved = self._steering
        try:
            return self._generate_tokens(tokens, steer_from, sampling, on_piece, should_stop, check)
        finally:
            self._install(saved)

    def _generate_tokens(self, tokens: Sequence[int], steer_from: int, sampling: Sampling,
                         on_piece: Callable[[str], bool | None] | None, should_stop: Callable[[], bool] | None,
                         check: ConditionCheck | None = None) -> GenerationResult:
        if sampling.max_tokens < 1:
            raise CaaError(f"max tokens must be at least 1, got {sampling.max_tokens}")
        if not tokens:
            raise CaaError("the prompt is empty")
        if not 0 <= steer_from <= len(tokens):
            raise CaaError(f"steer_from {steer_from} is outside the prompt of {len(tokens)} tokens")
        tokens = list(tokens)
        session = self._session
        max_tokens = min(sampling.max_tokens, session.n_ctx)  # the context bounds any answer
        start = time.perf_counter()
        reused, stopped, report = self._feed(tokens, steer_from, min(max_tokens, 16), should_stop, check)
        prompt_seconds = time.perf_counter() - start
        steering = self._steering.to_dict()
        if stopped:
            return GenerationResult("", [], "stopped", len(tokens), reused, prompt_seconds, 0.0, steering, report)
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
            steering=steering, conditions=report,
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

    # -- batched scoring and reading (caa_local.engine.scoring, caa_local.engine.reads) ----------
    def scorer(self, prefixes: Sequence[Sequence[int]], n_options: int, max_tail: int,
               keep: bool = False) -> _native.Scorer:
        """A native Scorer on this context's model and threads: each of ``prefixes`` decoded
        once, unsteered, in a KV stream of its own (see caa_local.engine.scoring). ``keep``:
        for question sets likely to be scored again; the scorer stays among the last ones kept
        (``KEPT_SCORER_BYTES``), and the same prefixes and options asked again get it back,
        its prefixes still decoded."""
        if not keep:
            return _native.Scorer(self._session, [list(p) for p in prefixes], n_options, max_tail)
        key = (n_options, tuple(tuple(p) for p in prefixes))
        scorer = self._scorers.pop(key, None)
        if scorer is None or scorer.max_tail < max_tail:
            scorer = _native.Scorer(self._session, [list(p) for p in key[1]], n_options, max_tail)
        self._scorers[key] = scorer
        per_cell = self._model.kv_bytes_per_token
        while self._scorers and sum(s.n_ctx for s in self._scorers.values()) * per_cell > KEPT_SCORER_BYTES:
            self._scorers.popitem(last=False)
        return scorer

    def reader(self, prefix: Sequence[int], layers: Sequence[int], max_pairs: int, max_len: int) -> _native.Reader:
        """A native Reader of block outputs on this context's model and threads, ``prefix``
        decoded once (see caa_local.engine.reads)."""
        return _native.Reader(self._session, list(prefix), list(layers), max_pairs, max_len)

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
