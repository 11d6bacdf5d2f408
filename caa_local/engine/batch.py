"""Many steered conversations in one llama.cpp context: continuous batching.

::

    from caa_local import Model
    from caa_local.engine.batch import Conversation

    model = Model()
    batch = Batch(model, n_seq=8, n_ctx=2048)            # one context, 8 KV streams
    engine = model.context(n_ctx=64)                    # for prompt rendering only
    items = [Conversation(*engine.prompt(messages), terms=terms, sampling=s) for ...]
    for result in batch.run(items):                     # every live sequence advances one
        print(result.text)                              # token per llama_decode

Each conversation has its own prompt, steering (terms, or none), sampling, seed, stop strings
and token budget. Its prompt is prefilled with the paper's position mask (positions before
``steer_from`` unsteered); a finished sequence leaves and a waiting one joins between steps,
reusing the longest prefix a free sequence has cached, or copying a longer one from another
sequence's cache (a shared system prompt, one prompt under several steerings) when that saves
more prefill than copying a KV stream costs. A decode whose rows share one steering
goes through llama.cpp's control vector; one that mixes steerings adds each row's direction at
the steered blocks' outputs (native/batch.cpp). ``submit``/``step``/``cancel`` drive it step by
step (the server's continuous batching); ``run`` answers a list at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from caa_local.core.errors import CaaError
from caa_local.core.steering import Steering, SteeringTerm
from caa_local.engine import _native
from caa_local.engine.engine import ContextFullError, GenerationResult, Sampling, check_sizes

if TYPE_CHECKING:
    from caa_local.engine.model import Model


# KV cache a batch that a command sizes itself (calibration, evaluation) may take: a 7B model
# without grouped-query attention (512 KiB a token) gets 5 sequences of 768 tokens, the
# default model every one it asks for. (The server's --parallel and --ctx are the user's.)
KV_BUDGET_BYTES = 2 << 30


def sequences_within(model: Model, wanted: int, n_ctx: int, kv_budget_bytes: int = KV_BUDGET_BYTES) -> int:
    """How many of ``wanted`` sequences of ``n_ctx`` tokens a batch on ``model`` holds within
    the KV budget (at least one)."""
    fit = kv_budget_bytes // max(model.kv_stream_bytes(n_ctx), 1)
    return max(1, min(wanted, _native.LLAMA_MAX_SEQ, fit))


@dataclass(frozen=True)
class Conversation:
    """One prompt to answer: tokens already rendered (``Engine.prompt``), where steering starts,
    the steering terms (empty: unsteered), sampling (with its seed and max_tokens) and stops."""

    tokens: Sequence[int]
    steer_from: int
    terms: Sequence[SteeringTerm] = ()
    sampling: Sampling = Sampling()
    stops: Sequence[str] = ()


@dataclass(frozen=True)
class Event:
    """What one step produced for one request: a piece of text, and at the end its result."""

    id: int
    piece: str
    result: GenerationResult | None  # set on the request's last event


class Batch:
    """``n_seq`` sequences (one KV stream each, ``n_ctx`` tokens each) in one context on ``model``."""

    def __init__(self, model: Model, n_seq: int, n_ctx: int = 4096, n_threads: int = 0, n_batch: int = 512) -> None:
        if not 1 <= n_seq <= _native.LLAMA_MAX_SEQ:
            raise CaaError(f"a batch holds 1..{_native.LLAMA_MAX_SEQ} sequences, got {n_seq}")
        check_sizes(n_ctx, n_threads)
        self.model = model
        try:
            self._native = _native.Batch(model.native, n_seq, n_ctx, n_threads, n_batch)
        except (ValueError, RuntimeError) as err:
            raise CaaError(f"{model.path.name}: {err}") from None
        self._steering: dict[int, list[dict[str, object]]] = {}
        self._texts: dict[int, list[str]] = {}  # pieces so far of requests driven by step()

    @property
    def n_seq(self) -> int:
        return int(self._native.n_seq)

    @property
    def n_ctx(self) -> int:
        """Tokens each sequence holds (llama.cpp pads a stream to a multiple of 256)."""
        return int(self._native.n_ctx_seq)

    @property
    def n_threads(self) -> int:
        return int(self._native.n_threads)

    @property
    def live(self) -> int:
        """Requests being decoded now."""
        return int(self._native.n_live)

    @property
    def waiting(self) -> int:
        """Requests queued for a free sequence."""
        return int(self._native.n_waiting)

    @property
    def force_rows(self) -> bool:
        """Add directions per row even where every row shares one steering (checks, benchmarks)."""
        return bool(self._native.force_rows)

    @force_rows.setter
    def force_rows(self, on: bool) -> None:
        self._native.force_rows = on

    @property
    def keep_logprobs(self) -> bool:
        """Keep the unsteered log-probability of every token an unsteered request samples, so
        that ``perplexities`` over those tokens reads it instead of decoding them again."""
        return bool(self._native.keep_logprobs)

    @keep_logprobs.setter
    def keep_logprobs(self, on: bool) -> None:
        self._native.keep_logprobs = on

    def counters(self) -> dict[str, int]:
        """llama_decode calls through the control vector and with per-row directions, the row
        additions made (a mixed batch that adds nothing would be a silent no-op), the scored
        tokens ``perplexities`` read from the cache (``keep_logprobs``) and the prompt prefixes a
        request copied from another sequence's cache."""
        cvec, rows, added, cached, shared = self._native.counters
        return {"decodes_cvec": cvec, "decodes_rows": rows, "rows_added": added, "scored_from_cache": cached,
                "prefixes_shared": shared}

    # -- requests ---------------------------------------------------------------------------
    def _request(self, item: Conversation, record_logits: bool = False) -> _native.BatchRequest:
        tokens = list(item.tokens)
        if not tokens:
            raise CaaError("the prompt is empty")
        if not 0 <= item.steer_from <= len(tokens):
            raise CaaError(f"steer_from {item.steer_from} is outside the prompt of {len(tokens)} tokens")
        s = item.sampling
        if s.max_tokens < 1:
            raise CaaError(f"max tokens must be at least 1, got {s.max_tokens}")
        if len(tokens) + 1 > self.n_ctx:
            raise ContextFullError(f"prompt of {len(tokens)} tokens does not fit a sequence's context of "
                                   f"{self.n_ctx} tokens (use --ctx to enlarge it)")
        params = _native.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p,
                                        repeat_penalty=s.repeat_penalty, repeat_last_n=64,
                                        seed=s.seed & 0xFFFFFFFF)
        packed = Steering(item.terms).buffer(self.model.n_embd, self.model.n_layer)
        if packed is not None:
            self.model.require_steerable()
        buf, il_start, il_end = packed if packed is not None else (None, -1, -1)
        return _native.BatchRequest(self.model.native, tokens, item.steer_from, params,
                                    min(s.max_tokens, self.n_ctx), list(item.stops), buf, il_start, il_end,
                                    record_logits)

    def submit(self, item: Conversation) -> int:
        """Queue ``item`` (from any thread); it joins at the next step with a free sequence."""
        request = self._request(item)
        try:
            id_ = int(self._native.submit(request))
        except _native.ContextFullError as err:
            raise ContextFullError(str(err)) from None
        except (ValueError, IndexError) as err:
            raise CaaError(str(err)) from None
        self._steering[id_] = Steering(item.terms).to_dict()
        self._texts[id_] = []
        return id_

    def cancel(self, id_: int) -> None:
        """Stop a queued or running request at the next step (from any thread)."""
        self._native.cancel(id_)

    def step(self) -> list[Event]:
        """Admit waiting requests, decode one token of every live one (GIL released)."""
        events = []
        for raw in self._native.step():
            id_, piece, done = raw[:3]
            pieces = self._texts.setdefault(id_, [])
            pieces.append(piece)
            if done:
                del self._texts[id_]
            events.append(self._event(raw, "".join(pieces)))
        return events

    def _event(self, raw: tuple, text: str) -> Event:  # type: ignore[type-arg]
        """An event from the native tuple; ``text``: the request's whole answer so far."""
        id_, piece, done, reason, tokens, n_prompt, n_reused, prompt_s, decode_s = raw[:9]
        if not done:
            return Event(id_, piece, None)
        result = GenerationResult(text=text, tokens=list(tokens), stop_reason=_REASONS.get(reason, reason),
                                  n_prompt_tokens=n_prompt, n_reused_tokens=n_reused, prompt_seconds=prompt_s,
                                  decode_seconds=decode_s, steering=self._steering.pop(id_, []))
        return Event(id_, piece, result)

    def run(self, items: Sequence[Conversation]) -> list[GenerationResult]:
        """Answer every item (all queued at once, decoded together); results in order, each
        with its whole text. Ctrl-C drops the run's requests and raises KeyboardInterrupt."""
        return [result for result, _ in self._run(items, False)]

    def run_logits(self, items: Sequence[Conversation]) -> list[tuple[GenerationResult, npt.NDArray[np.float32]]]:
        """``run``, with the logits every answer token was sampled from: (tokens, n_vocab) per
        item, the first row the prompt's last position (for checks and tests)."""
        return self._run(items, True)

    def _run(self, items: Sequence[Conversation], record_logits: bool
             ) -> list[tuple[GenerationResult, npt.NDArray[np.float32]]]:
        requests = [self._request(item, record_logits) for item in items]
        try:
            raw = self._native.run(requests)
        except _native.ContextFullError as err:
            raise ContextFullError(str(err)) from None
        except (ValueError, IndexError) as err:
            raise CaaError(str(err)) from None
        out = []
        empty = np.zeros((0, self.model.n_vocab), np.float32)
        for item, event in zip(items, raw):
            self._steering[event[0]] = Steering(item.terms).to_dict()
            result = self._event(event, event[1]).result  # run() gives the whole text
            assert result is not None  # run() returns done events only
            out.append((result, empty if event[9] is None else event[9]))
        return out

    def perplexities(self, items: Sequence[tuple[Sequence[int], int]]) -> list[float]:
        """For each ``(tokens, first)``: the unsteered model's perplexity of ``tokens[first:]``
        after the tokens before (NaN: nothing to score). Decoded as prefills only, each reusing
        the longest prefix a free sequence has cached and leaving its KV there: a conversation
        scored turn after turn (or answered after it was scored) decodes only its new tokens."""
        out = [math.nan] * len(items)
        wanted = []
        for i, (tokens, first) in enumerate(items):
            if len(tokens) > self.n_ctx:
                raise ContextFullError(f"{len(tokens)} tokens to score do not fit a sequence's context of "
                                       f"{self.n_ctx} tokens")
            if 1 <= first < len(tokens):
                wanted.append(i)
        requests = [_native.BatchRequest(self.model.native, list(items[i][0]), len(items[i][0]),
                                         _native.SamplingParams(), 1, score_from=items[i][1]) for i in wanted]
        try:
            raw = self._native.run(requests)
        except (ValueError, IndexError) as err:
            raise CaaError(str(err)) from None
        for i, event in zip(wanted, raw):
            logprob, n_scored = event[10], event[11]
            out[i] = math.exp(-logprob / n_scored)
        return out


# The engine's own names: a cancelled request "stopped" as Engine.generate's should_stop does.
_REASONS = {"cancelled": "stopped"}
