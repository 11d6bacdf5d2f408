"""The chat REPL's logic: a ChatSession answers lines and slash commands, no terminal needed.

``ChatSession.handle(line)`` streams an answer (or runs a command) through ``write`` and
returns what it wrote, so tests drive it directly (cli_chat.repl adds the terminal). One
Engine serves the whole chat: each turn passes the full message list and the engine reuses
the cached prefix. A change of vector or multiplier only re-composes the steering buffer:
it applies from the next generated token, with nothing reloaded.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable
from pathlib import Path

import click

from caa_local.chat.conditions import describe_report, gate, load_condition
from caa_local.core.atomic import write_json
from caa_local.core.positions import check_positions
from caa_local.engine.engine import CHAT_SAMPLING, ContextFullError, Engine, GenerationResult, Sampling
from caa_local.core.errors import CaaError
from caa_local.core.layers import parse_layer_spec
from caa_local.core.locate import shipped_vector_names
from caa_local.core.locate import load_vector
from caa_local.core.parsing import PARAMS, parse_param, parse_scale, split_vector_spec
from caa_local.core.steering import SteeringTerm, multiplier_warning
from caa_local.core.templates import Message, drop_oldest_exchange

PROMPT = "> "


def _echo(text: str) -> None:
    click.echo(text, nl=False)  # click.echo flushes


class ChatSession:
    """Messages, sampling and a transcript around one Engine; ``handle`` runs one input line."""

    def __init__(self, engine: Engine, sampling: Sampling = CHAT_SAMPLING, system: str | None = None,
                 write: Callable[[str], None] | None = None, any_arch: bool = False,
                 positions: str = "response") -> None:
        self.engine = engine
        self.sampling = sampling
        self.any_arch = any_arch  # accept vectors made for another architecture
        self.positions = check_positions(positions)
        self.messages: list[Message] = []
        self.transcript: list[dict[str, object]] = []
        self.comparisons: list[dict[str, object]] = []
        self.last_result: GenerationResult | None = None
        self.finished = False
        self._write = write or _echo
        self._captured: list[str] = []
        self._fresh_line = True
        if system:
            self.cmd_system(system)
            self._captured = []

    # -- output -----------------------------------------------------------------------------
    def out(self, text: str) -> None:
        if text:
            self._captured.append(text)
            self._write(text)
            self._fresh_line = text.endswith("\n")

    def say(self, text: str = "") -> None:
        """One line of text, started on a fresh line."""
        self.out(("" if self._fresh_line else "\n") + text + "\n")

    def status(self) -> str:
        last = self.last_result.conditions if self.last_result is not None else []
        checked = f" [last answer: {describe_report(last)}]" if last and self.engine.steering.conditional else ""
        return f"[steer: {self.engine.steering.describe()}]{checked}"

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, line: str) -> str:
        """Run one input line (a message or a /command); returns what it wrote."""
        self._captured = []
        text = line.strip()
        try:
            if text.startswith("/"):
                name, _, rest = text[1:].partition(" ")
                command = getattr(self, f"cmd_{name.lower()}", None) if name.isidentifier() else None
                if command is None:
                    raise CaaError(f"unknown command /{name} (type /help for the list)")
                command(rest.strip())
            elif text:
                self.ask(text)
        except CaaError as err:
            self.say(f"Error: {err}")
        return "".join(self._captured)

    @staticmethod
    def _args(rest: str, usage: str, lo: int, hi: int) -> list[str]:
        try:
            args = shlex.split(rest)
        except ValueError as err:
            raise CaaError(f"{usage}: {err}") from None
        if not lo <= len(args) <= hi:
            raise CaaError(f"usage: {usage}")
        return args

    # -- conversation -----------------------------------------------------------------------
    def _record(self, role: str, content: str, result: GenerationResult | None = None) -> None:
        turn: dict[str, object] = {
            "role": role, "content": content,
            "steering": result.steering if result else self.engine.steering.to_dict(),
            "sampling": dataclasses.asdict(self.sampling),
        }
        if result is not None:
            if result.conditions:
                turn["conditions"] = result.conditions
            turn.update(stop_reason=result.stop_reason, interrupted=result.stop_reason == "interrupted",
                        n_tokens=len(result.tokens),
                        tokens_per_second=round(result.decode_tokens_per_second, 2))
        self.transcript.append(turn)

    def ask(self, text: str) -> GenerationResult:
        before = list(self.messages)
        self.messages.append({"role": "user", "content": text})
        try:
            result = self._answer(self.messages)
        except CaaError:
            self.messages = before
            raise
        self._record("user", text)
        self.messages.append({"role": "assistant", "content": result.text})
        self._record("assistant", result.text, result)
        return result

    def _answer(self, messages: list[Message]) -> GenerationResult:
        """Stream an answer to ``messages``; on a full context drop the oldest exchange and retry."""
        alone = [m for m in messages[:1] if m["role"] == "system"] + messages[-1:]
        if len(self.engine.prompt(alone)[0]) >= self.engine.n_ctx:
            raise CaaError(f"this message does not fit the context of {self.engine.n_ctx} "
                           "tokens, even alone (use --ctx to enlarge it)")
        while True:
            try:
                return self._stream(messages)
            except ContextFullError as err:
                if not drop_oldest_exchange(messages):
                    raise CaaError(f"this message does not fit the context: {err}") from None
                self.say(f"[context full: dropped the oldest exchange; {len(messages)} messages left]")

    def _stream(self, messages: list[Message]) -> GenerationResult:
        try:
            result = self.engine.generate(messages, self.sampling, on_piece=self.out, positions=self.positions)
        except KeyboardInterrupt:  # during the prompt, before the first token
            result = GenerationResult("", [], "interrupted", 0, 0, 0.0, 0.0, self.engine.steering.to_dict())
        self.say("[interrupted]" if result.stop_reason == "interrupted" else
                 "[context full: answer cut short]" if result.stop_reason == "context" else "")
        self.last_result = result
        return result

    # -- commands ---------------------------------------------------------------------------
    def cmd_help(self, rest: str) -> None:
        """/help  --  this list"""
        self.say(help_text())

    def cmd_quit(self, rest: str) -> None:
        """/quit  --  exit (or Ctrl-D)"""
        self.finished = True

    cmd_exit = cmd_quit

    def cmd_vectors(self, rest: str) -> None:
        """/vectors  --  active and shipped vectors"""
        terms = self.engine.steering.terms
        self.say("active:" + ("" if terms else " none"))
        for term in terms:
            behavior = term.vector.metadata.get("behavior", "")
            self.say(f"  {term.describe()}" + (f"  ({behavior})" if behavior else ""))
        self.say("shipped: " + (", ".join(shipped_vector_names()) or "none"))

    def cmd_steer(self, rest: str) -> None:
        """/steer NAME|FILE [SCALE] [LAYERS]  --  add or change a steering vector"""
        args = self._args(rest, "/steer NAME|FILE [SCALE] [LAYERS]", 1, 3)
        target, scale = split_vector_spec(args[0])
        if len(args) > 1:
            scale = parse_scale(args[1], "/steer scale")
        layers = parse_layer_spec(args[2], self.engine.n_layer) if len(args) > 2 else None
        path, vector = load_vector(target)
        name = path.stem
        if scale is None:
            scale = vector.recommended_multiplier() or 1.0
        term = self.engine.steer(name, vector, scale, layers, any_arch=self.any_arch)
        self.say(f"steering: {term.describe()}")
        if warning := multiplier_warning(scale):
            self.say(warning)

    def cmd_unsteer(self, rest: str) -> None:
        """/unsteer [NAME]  --  remove one vector, or all"""
        args = self._args(rest, "/unsteer [NAME]", 0, 1)
        self.engine.unsteer(args[0] if args else None)
        self.say(f"removed {args[0]}; {self.status()}" if args else "steering off")

    def cmd_when(self, rest: str) -> None:
        """/when VECTOR [!]CONDITION [THRESHOLD]  --  steer with VECTOR only when CONDITION fires (again: OR; 'always' undoes)"""
        args = self._args(rest, "/when VECTOR [!]CONDITION [THRESHOLD]", 2, 3)
        if args[1] == "always" and len(args) == 2:
            term = gate(self.engine, [args[0]], [], add=False)[0]
        else:
            spec = f"{args[1]}:{args[2]}" if len(args) == 3 else args[1]
            condition = load_condition(self.engine, spec, self.any_arch)
            term = gate(self.engine, [args[0]], [condition])[0]
        self.say(f"steering: {term.describe()}")

    def cmd_conditions(self, rest: str) -> None:
        """/conditions  --  conditional vectors, and what their conditions scored on the last answer"""
        waiting = self.engine.steering.conditional
        self.say("conditional:" + ("" if waiting else " none (use /when VECTOR CONDITION)"))
        for term in waiting:
            self.say(f"  {term.describe()}")
        last = self.last_result.conditions if self.last_result is not None else []
        if last:
            self.say(f"last answer: {describe_report(last)}")

    def _term(self, name: str) -> SteeringTerm:
        term = self.engine.steering.get(name)
        if term is None:
            active = ", ".join(t.name for t in self.engine.steering.terms) or "none"
            raise CaaError(f"no active vector named {name!r} (active: {active}; use /steer first)")
        return term

    def cmd_scale(self, rest: str) -> None:
        """/scale NAME X  --  change a multiplier (applies from the next token)"""
        name, value = self._args(rest, "/scale NAME X", 2, 2)
        scale = parse_scale(value, "/scale")
        term = self._term(name)
        start = time.perf_counter()
        term = term.at(scale=scale)
        self.engine.set_steering([term if t.name == name else t for t in self.engine.steering.terms])
        self.say(f"steering: {term.describe()} (applied in {(time.perf_counter() - start) * 1e3:.2f} ms)")
        if warning := multiplier_warning(scale):
            self.say(warning)

    def cmd_layers(self, rest: str) -> None:
        """/layers [NAME] SPEC  --  move vectors to layers, e.g. 12, 10-14 or all"""
        args = self._args(rest, "/layers [NAME] SPEC", 1, 2)
        terms = [self._term(args[0])] if len(args) == 2 else self.engine.steering.terms
        if not terms:
            raise CaaError("no active vectors (use /steer first)")
        layers = tuple(parse_layer_spec(args[-1], self.engine.n_layer))
        moved = {t.name: t.at(layer=layers) for t in terms}
        self.engine.set_steering([moved.get(t.name, t) for t in self.engine.steering.terms])  # all or nothing
        self.say(f"steering: {self.engine.steering.describe()}")

    def cmd_compare(self, rest: str) -> None:
        """/compare [PROMPT]  --  answer unsteered, then steered, with the same seed"""
        if rest:
            prompt, messages = rest, [*self.messages, Message(role="user", content=rest)]
        else:
            users = [i for i, m in enumerate(self.messages) if m["role"] == "user"]
            if not users:
                raise CaaError("no user message yet: use /compare PROMPT")
            prompt, messages = self.messages[users[-1]]["content"], self.messages[: users[-1] + 1]
        steering = self.engine.steering
        if not steering:
            self.say("(no steering active: both answers are unsteered)")
        self.say("--- unsteered ---")
        with self.engine.unsteered():
            base = self._answer(list(messages))
        if base.stop_reason == "interrupted":
            return
        self.say(f"--- steered [{steering.describe()}] ---")
        steered = self._answer(list(messages))
        self.comparisons.append({
            "prompt": prompt, "unsteered": base.text, "steered": steered.text,
            "steering": steered.steering, "sampling": dataclasses.asdict(self.sampling),
        })

    def cmd_system(self, rest: str) -> None:
        """/system [TEXT]  --  show or set the system message"""
        has_system = bool(self.messages) and self.messages[0]["role"] == "system"
        if not rest:
            self.say(f"system: {self.messages[0]['content'] if has_system else '(none)'}")
            return
        if has_system:
            self.messages[0] = {"role": "system", "content": rest}
        else:
            self.messages.insert(0, {"role": "system", "content": rest})
        self._record("system", rest)
        self.say("system message set")

    def cmd_reset(self, rest: str) -> None:
        """/reset  --  start a new conversation"""
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        self.messages = system
        self.transcript = [t for t in self.transcript[:1] if t["role"] == "system"] if system else []
        self.comparisons = []
        self.say("conversation reset" + (" (system message kept)" if system else ""))

    def cmd_params(self, rest: str) -> None:
        """/params [key=value ...]  --  show or set temperature, top_p, max_tokens, seed, ..."""
        updates: dict[str, object] = {}
        for item in self._args(rest, "/params [key=value ...]", 0, len(PARAMS)):
            key, sep, value = item.partition("=")
            if not sep or key not in PARAMS:
                raise CaaError(f"/params: expected key=value with key in {', '.join(PARAMS)}, got {item!r}")
            updates[key] = parse_param(key, value)
        self.sampling = dataclasses.replace(self.sampling, **updates)
        self.say(" ".join(f"{k}={getattr(self.sampling, k):g}" for k in PARAMS))

    def cmd_save(self, rest: str) -> None:
        """/save FILE [--force]  --  write the transcript as JSON"""
        args = self._args(rest, "/save FILE [--force]", 1, 2)
        force = "--force" in args
        files = [a for a in args if a != "--force"]
        if len(files) != 1:
            raise CaaError("usage: /save FILE [--force]")
        path = Path(files[0]).expanduser()
        write_json(path, self.to_dict(), force=force)
        self.say(f"saved {len(self.transcript)} turns to {path}")

    def to_dict(self) -> dict[str, object]:
        return {"model": self.engine.model_name, "model_path": str(self.engine.model_path),
                "positions": self.positions, "turns": self.transcript,
                "comparisons": self.comparisons}


def help_text() -> str:
    """The REPL's command list, from the cmd_* methods' docstrings (/quit last)."""
    commands = list(dict.fromkeys(getattr(ChatSession, name) for name in vars(ChatSession) if name.startswith("cmd_")))
    commands.sort(key=lambda cmd: cmd.__name__ == "cmd_quit")
    rows = [(cmd.__doc__ or "").split("  --  ", 1) for cmd in commands]
    width = max(len(usage) for usage, _ in rows) + 2
    return "Commands:\n" + "\n".join(f"  {usage:<{width}}{what}" for usage, what in rows)
