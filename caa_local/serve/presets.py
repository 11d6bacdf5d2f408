"""Presets: a steering chosen by model name, for clients that can only pick a model.

A preset is a name, steering terms (vector ids, scales, layers), optional positions, system
prompt and sampling defaults. They come from four places, later ones replacing earlier ones of
the same name:

1. every calibrated vector in the library (one with a ``caa.calibration`` summary, as
   ``caa-local calibrate`` writes it): ``NAME`` at its recommended multiplier and layer, and
   ``NAME-neg`` at its negative limit (when the calibration found one);
2. ``--presets FILE`` (TOML or JSON: ``[presets.NAME]`` tables / ``{"presets": {NAME: {...}}}``);
3. ``--preset NAME=VECTOR[:SCALE][@LAYERS][,VECTOR...]`` on the command line;
4. ``POST /v1/presets`` (the page's "save as preset"), written back to FILE when it is writable.

The plain model answers to ``default``, ``caa-local``, the model file's name and stem and the
GGUF's ``general.name``; a name may carry Ollama's ``:latest`` tag. Any other name is a 404 listing the
names there are.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from caa_local.core.atomic import write_text
from caa_local.core.errors import CaaError
from caa_local.core.steering import SteeringTerm
from caa_local.engine.engine import Engine
from caa_local.serve.config import ServeConfig
from caa_local.serve.errors import ApiError, validation_message
from caa_local.serve.library import NAME, VectorLibrary
from caa_local.serve.limits import parse_json
from caa_local.serve.planning import Defaults, make_terms, steering_echo
from caa_local.serve.protocol import ChatCompletionRequest, ChatMessage, SteeringItem

log = logging.getLogger("caa_local.serve")

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PLAIN_ALIAS = "default"
PROJECT_ALIAS = "caa-local"  # what the README's examples sent before presets existed
TAG = ":latest"
NEG_SUFFIX = "-neg"
# Request fields a preset may give defaults for (the request's own value wins).
BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
OPTION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed")


class PresetSpec(BaseModel):
    """A preset as written in a presets file or sent to POST /v1/presets."""

    model_config = ConfigDict(extra="forbid")
    steering: list[SteeringItem] = Field(default_factory=list)
    positions: Literal["response", "all"] | None = None
    system: str | None = Field(default=None, max_length=100_000)
    options: dict[str, Union[float, int]] = Field(default_factory=dict)
    description: str = Field(default="", max_length=1000)


class SaveRequest(PresetSpec):
    name: str
    replace: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    spec: PresetSpec
    terms: tuple[SteeringTerm, ...]
    source: str  # "calibration", "command line", the presets file's name, "saved"
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"id": self.name, "object": "preset", "steering": steering_echo(self.terms),
                "positions": self.spec.positions, "system": self.spec.system, "options": self.options,
                "description": self.spec.description, "source": self.source}


def check_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or ":" in name:
        raise CaaError(f"{where}: {name!r} is not a preset name (letters, digits, _ . + -, "
                       "starting with a letter or digit, at most 128)")
    return name


def check_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """The sampling defaults, checked by the request model itself (one home for each bound)."""
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise CaaError(f"{where}.options: unknown key {unknown[0]!r} (known: {', '.join(OPTION_KEYS)})")
    try:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "."}], **options})
    except ValidationError as err:
        message, _ = validation_message(list(err.errors()))
        raise CaaError(f"{where}.options.{message}") from None
    return dict(options)


def parse_preset_flag(text: str) -> tuple[str, PresetSpec]:
    """``NAME=VECTOR[:SCALE][@LAYERS][,VECTOR[:SCALE][@LAYERS]...]`` (an empty right side: no steering)."""
    name, sep, rest = text.partition("=")
    if not sep:
        raise CaaError(f"--preset {text!r}: expected NAME=VECTOR[:SCALE][@LAYERS][,VECTOR...]")
    check_name(name.strip(), f"--preset {text!r}")
    items = []
    for part in filter(None, (p.strip() for p in rest.split(","))):
        head, _, layers = part.partition("@")
        vector, colon, scale_text = head.partition(":")
        try:
            scale = float(scale_text) if colon else 1.0
        except ValueError:
            raise CaaError(f"--preset {text!r}: scale {scale_text!r} is not a number") from None
        if not math.isfinite(scale):
            raise CaaError(f"--preset {text!r}: scale must be finite, got {scale_text!r}")
        items.append(SteeringItem(vector=vector.strip(), scale=scale, layers=layers.strip() or None))
    return name.strip(), PresetSpec(steering=items)


def read_presets_file(path: Path) -> dict[str, PresetSpec]:
    """name -> spec from a TOML or JSON presets file; a file that does not exist yet is empty."""
    kind = file_kind(path)
    if not path.exists():
        if not path.parent.is_dir():
            raise CaaError(f"--presets {path}: no such directory {str(path.parent)!r} to create it in")
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if kind == "toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as err:  # TOMLDecodeError and JSONDecodeError are ValueErrors
        raise CaaError(f"--presets {path}: cannot read it: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("presets", {}), dict) or set(data) - {"presets"}:
        raise CaaError(f"--presets {path}: expected a 'presets' table of NAME = {{steering, positions, system, "
                       "options, description}}")
    out = {}
    for name, body in data.get("presets", {}).items():
        where = f"--presets {path}: presets.{name}"
        check_name(name, where)
        try:
            spec = PresetSpec.model_validate(body)
        except ValidationError as err:
            message, _ = validation_message(list(err.errors()))
            raise CaaError(f"{where}: {message}") from None
        check_options(spec.options, where)
        out[name] = spec
    return out


def file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise CaaError(f"--presets {path}: expected a .toml or .json file")
    return suffix[1:]


def can_write(path: Path) -> bool:
    if path.exists():
        return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    return path.parent.is_dir() and os.access(path.parent, os.W_OK)


# -- writing a presets file ------------------------------------------------------------------
def spec_data(spec: PresetSpec) -> dict[str, Any]:
    return spec.model_dump(exclude_defaults=True, exclude_none=True)


def presets_json(specs: dict[str, PresetSpec]) -> str:
    return json.dumps({"presets": {name: spec_data(s) for name, s in specs.items()}}, indent=2,
                      ensure_ascii=False) + "\n"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    if isinstance(value, str):  # JSON's escapes are TOML basic-string escapes; TOML also wants DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def toml_key(key: str) -> str:
    return key if BARE_KEY.match(key) else toml_value(key)


def presets_toml(specs: dict[str, PresetSpec]) -> str:
    lines = ["# caa-local presets: each [presets.NAME] is a model name clients can pick.", ""]
    for name, spec in specs.items():
        lines.append(f"[presets.{toml_key(name)}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in spec_data(spec).items()]
        lines.append("")
    return "\n".join(lines)


# -- the book -----------------------------------------------------------------------------------
class PresetBook:
    """Every preset by name, and the plain model's aliases; resolves a request's ``model``."""

    def __init__(self, engine: Engine, library: VectorLibrary, config: ServeConfig, plain: Defaults,
                 file: Path | None = None) -> None:
        self.engine = engine
        self.library = library
        self.config = config
        self.plain = plain
        self.file = file
        self.presets: dict[str, Preset] = {}
        self.model_id = config.model_id or engine.model_path.name
        names = (PLAIN_ALIAS, PROJECT_ALIAS, self.model_id, engine.model_path.name, engine.model_path.stem,
                 engine.model.name)
        self.aliases = tuple(dict.fromkeys(n for n in names if n))
        self._lock = threading.Lock()

    @classmethod
    def build(cls, engine: Engine, library: VectorLibrary, config: ServeConfig, plain: Defaults,
              flags: Sequence[str] = (), file: Path | None = None) -> PresetBook:
        """Calibrated vectors, then the file, then --preset flags; any bad one is a CaaError."""
        book = cls(engine, library, config, plain, file)
        book.add_calibrated()
        if file is not None:
            for name, spec in read_presets_file(file).items():
                book.add(name, spec, file.name)
        for flag in flags:
            name, spec = parse_preset_flag(flag)
            book.add(name, spec, "command line")
        return book

    @property
    def writable(self) -> bool:
        return self.file is not None and can_write(self.file)

    def add_calibrated(self) -> None:
        for entry in sorted(self.library.entries.values(), key=lambda e: e.name):
            vector = entry.vector
            if not entry.fits or vector.calibration() is None or vector.recommended_multiplier() is None:
                continue
            layer = vector.recommended_layer()
            layers = str(layer) if layer is not None else None
            sides = [("", vector.recommended_multiplier(), "recommended setting"),
                     (NEG_SUFFIX, vector.negative_multiplier_limit(), "negative limit")]
            for suffix, scale, what in sides:
                if scale is None:
                    continue
                spec = PresetSpec(steering=[SteeringItem(vector=entry.name, scale=scale, layers=layers)],
                                  description=f"calibrated {what}")
                try:  # a vector file is no reason to refuse to start: its preset is left out, with a warning
                    self.add(entry.name + suffix, spec, "calibration")
                except CaaError as err:
                    log.warning("preset left out: %s", err)

    def is_plain(self, name: str) -> bool:
        return name in self.aliases

    def make(self, name: str, spec: PresetSpec, source: str) -> Preset:
        """A checked preset; CaaError (start-up) or ApiError (from make_terms) when it is wrong."""
        check_name(name, "preset")
        if self.is_plain(name):
            raise CaaError(f"preset {name!r}: that name is the plain model's ({', '.join(self.aliases)})")
        options = check_options(spec.options, f"preset {name!r}")
        terms = make_terms(self.engine, self.library, spec.steering, self.config)
        return Preset(name, spec, tuple(terms), source, options)

    def add(self, name: str, spec: PresetSpec, source: str) -> Preset:
        try:
            preset = self.make(name, spec, source)
        except ApiError as err:  # a start-up preset names a vector or layer that is not there
            raise CaaError(f"preset {name!r} ({source}): {err.message}") from None
        self.presets[name] = preset
        return preset

    # -- requests ------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return [self.model_id, *sorted(self.presets)]

    def resolve(self, model: str | None, param: str = "model") -> Preset | None:
        """The preset a request's model names; None for the plain model; a 404 for anything else."""
        name = (model or "").strip()
        if name.endswith(TAG):
            name = name[:-len(TAG)]
        if not name or self.is_plain(name):
            return None
        preset = self.presets.get(name)
        if preset is None:
            shown = ", ".join([*self.aliases, *sorted(self.presets)])
            raise ApiError(f"{param}: no model or preset named {model!r} (available: {shown})", "not_found",
                           param, "model_not_found")
        return preset

    def defaults(self, preset: Preset | None) -> Defaults:
        """What a request with no `steering` field gets under this model name."""
        if preset is None:
            return self.plain
        return Defaults(preset.terms, preset.spec.positions or self.config.positions)

    @staticmethod
    def apply(preset: Preset | None, request: ChatCompletionRequest) -> ChatCompletionRequest:
        """The request with the preset's system prompt (when it has none) and sampling defaults."""
        if preset is None:
            return request
        update: dict[str, Any] = {k: v for k, v in preset.options.items() if getattr(request, k) is None}
        if "max_tokens" in update and request.max_completion_tokens is not None:
            del update["max_tokens"]
        if preset.spec.system and not any(m.role in ("system", "developer") for m in request.messages):
            update["messages"] = [ChatMessage(role="system", content=preset.spec.system), *request.messages]
        return request.model_copy(update=update) if update else request

    def describe(self) -> list[dict[str, Any]]:
        return [self.presets[name].describe() for name in sorted(self.presets)]

    # -- saving ---------------------------------------------------------------------------------
    def save(self, request: SaveRequest) -> tuple[Preset, bool]:
        """Add a preset from the page; (preset, written to the presets file)."""
        try:
            check_name(request.name, "name")
        except CaaError as err:
            raise ApiError(str(err), "invalid_request", "name", "invalid_preset_name") from None
        if self.is_plain(request.name):
            raise ApiError(f"name: {request.name!r} is the plain model's name", "invalid_request", "name",
                           "invalid_preset_name")
        spec = PresetSpec.model_validate(request.model_dump(exclude={"name", "replace"}))
        try:
            check_options(spec.options, "preset")
        except CaaError as err:
            raise ApiError(str(err), "invalid_request", "options") from None
        with self._lock:
            if request.name in self.presets and not request.replace:
                raise ApiError(f"name: a preset named {request.name!r} exists (send \"replace\": true to replace it)",
                               "conflict", "name", "preset_exists")
            preset = self.make(request.name, spec, "saved")
            written = False
            if self.writable:
                assert self.file is not None
                try:  # read again: the file may have been edited since start-up, and those edits stay
                    specs = {**read_presets_file(self.file), request.name: spec}
                except CaaError as err:
                    problem = str(err).replace(f"--presets {self.file}: ", "")  # no server path to the client
                    raise ApiError(f"cannot add to {self.file.name}: it no longer reads as a presets file "
                                   f"({problem}); fix or remove it", "conflict", None, "presets_file_broken") from None
                text = presets_toml(specs) if file_kind(self.file) == "toml" else presets_json(specs)
                try:
                    write_text(self.file, text, force=True)
                except OSError as err:
                    raise ApiError(f"cannot write {self.file.name}: {err.strerror}", "server") from None
                preset = Preset(preset.name, preset.spec, preset.terms, self.file.name, preset.options)
                written = True
            self.presets[request.name] = preset
        return preset, written


# -- HTTP ---------------------------------------------------------------------------------------
def mount(app: FastAPI, book: PresetBook) -> None:
    """GET /v1/presets lists them; POST /v1/presets adds one (the page's "save as preset")."""

    @app.get("/v1/presets")
    async def list_presets() -> dict[str, Any]:
        return {"object": "list", "data": book.describe(), "model": book.model_id, "aliases": list(book.aliases),
                "file": book.file.name if book.file else None, "writable": book.writable}

    @app.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        """OpenAI's "retrieve model": the plain model under any of its names, or a preset."""
        preset = book.resolve(name)
        entry = {"id": preset.name if preset else book.model_id, "object": "model", "created": 0,
                 "owned_by": "caa-local"}
        return {**entry, "steering": preset.describe()["steering"]} if preset else \
            {**entry, "aliases": list(book.aliases)}

    @app.post("/v1/presets")
    async def save_preset(request: Request) -> JSONResponse:
        data = parse_json(await request.body())
        try:
            body = SaveRequest.model_validate(data)
        except ValidationError as err:
            message, param = validation_message(list(err.errors()))
            raise ApiError(message, "validation", param) from None
        preset, written = book.save(body)
        return JSONResponse({**preset.describe(), "saved_to": book.file.name if written and book.file else None},
                            status_code=201)
