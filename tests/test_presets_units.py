"""Presets and the Ollama translation without a model: the --preset syntax, the presets file
(TOML and JSON, read back what it writes), option mapping and error renaming."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from caa_local.core.errors import CaaError  # noqa: E402
from caa_local.serve.errors import ApiError  # noqa: E402
from caa_local.serve.ollama import OllamaChat, options_fields, renamed  # noqa: E402
from caa_local.serve.presets import (PresetSpec, parse_preset_flag, presets_json, presets_toml,  # noqa: E402
                                     read_presets_file)
from caa_local.serve.protocol import SteeringItem  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_preset_flag_terms_scales_and_layers() -> None:
    name, spec = parse_preset_flag("cheerful=sentiment:1.5@23,formality:-2@10-12,enthusiasm")
    assert name == "cheerful"
    assert [(s.vector, s.scale, s.layers) for s in spec.steering] == [
        ("sentiment", 1.5, "23"), ("formality", -2.0, "10-12"), ("enthusiasm", 1.0, None)]
    assert parse_preset_flag("plain=")[1].steering == []


@pytest.mark.parametrize("flag, fragment", [
    ("nameonly", "expected NAME=VECTOR"),
    ("a b=sentiment", "is not a preset name"),
    ("x:latest=sentiment", "is not a preset name"),
    ("x=sentiment:lots", "is not a number"),
    ("x=sentiment:inf", "must be finite"),
])
def test_bad_preset_flags_name_the_problem(flag: str, fragment: str) -> None:
    with pytest.raises(CaaError, match=fragment):
        parse_preset_flag(flag)


SPEC = PresetSpec(steering=[SteeringItem(vector="sentiment", scale=-1.25, layers="23")], positions="all",
                  system='Say "hi"\n\tand \\ go \x7f é', options={"temperature": 0.3, "max_tokens": 40},
                  description="a test")


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_presets_file_reads_back_what_it_writes(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"presets{suffix}"
    specs = {"calm": SPEC, "my.preset-2": PresetSpec(steering=[])}
    path.write_text(presets_toml(specs) if suffix == ".toml" else presets_json(specs), encoding="utf-8")
    assert read_presets_file(path) == specs


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.floats(min_value=-100, max_value=100, allow_nan=False))
def test_toml_strings_and_numbers_round_trip(text: str, scale: float) -> None:
    spec = PresetSpec(steering=[SteeringItem(vector="v", scale=scale)], system=text)
    data = tomllib.loads(presets_toml({"p": spec}))
    assert data["presets"]["p"]["steering"][0]["scale"] == scale
    assert data["presets"]["p"].get("system") == text


@pytest.mark.parametrize("name, text, fragment", [
    ("p.toml", "[presets.x]\nsteering = 3\n", "steering"),
    ("p.toml", "[presets.x]\nsteerin = []\n", "steerin"),
    ("p.toml", "presets = [", "cannot read it"),
    ("p.json", '{"presets": {"x": {"options": {"temperature": -1}}}}', "options.temperature"),
    ("p.json", '{"presets": {"x": {"options": {"mirostat": 2}}}}', "unknown key 'mirostat'"),
    ("p.json", '{"presets": {"bad name": {}}}', "is not a preset name"),
    ("p.json", '{"other": {}}', "expected a 'presets' table"),
    ("p.json", '[1, 2]', "expected a 'presets' table"),
    ("p.yaml", "presets: {}", "expected a .toml or .json file"),
])
def test_bad_presets_files_name_the_problem(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CaaError, match=fragment):
        read_presets_file(path)


def test_a_presets_file_that_does_not_exist_yet_is_empty(tmp_path: Path) -> None:
    assert read_presets_file(tmp_path / "new.toml") == {}
    with pytest.raises(CaaError, match="no such directory"):
        read_presets_file(tmp_path / "typo" / "new.toml")


def test_ollama_options_map_to_request_fields() -> None:
    body = OllamaChat.model_validate({"model": "m", "messages": [], "steering": [{"vector": "v", "scale": 1}],
                                      "options": {"temperature": 0, "num_predict": 12, "top_k": 5, "stop": ["x"],
                                                  "num_ctx": 256, "num_thread": 4, "mirostat": 0}})
    fields, names, ctx = options_fields(body, 1024)
    assert fields == {"temperature": 0, "max_tokens": 12, "top_k": 5, "stop": ["x"],
                      "steering": [{"vector": "v", "scale": 1}]}
    assert names["max_tokens"] == "options.num_predict" and names["steering"] == "steering"
    assert ctx == 256
    unlimited = OllamaChat.model_validate({"options": {"num_predict": -1, "seed": -1}})
    assert options_fields(unlimited, 1024)[0] == {}


@pytest.mark.parametrize("options, top, fragment", [
    ({"num_ctx": 4096}, {}, "options.num_ctx: 4096 is more than"),
    ({"num_ctx": 0}, {}, "options.num_ctx: expected a positive integer"),
    ({"mirostat": 2}, {}, "options.mirostat: not supported"),
    ({"steering": []}, {"steering": []}, "given both"),
])
def test_bad_ollama_options(options: dict, top: dict, fragment: str) -> None:
    body = OllamaChat.model_validate({"options": options, **top})
    with pytest.raises(ApiError, match=fragment):
        options_fields(body, 1024)


def test_errors_are_renamed_to_the_field_the_client_sent() -> None:
    err = ApiError("max_tokens: 9000 tokens do not fit", "context_length", "max_tokens", "context_length_exceeded")
    out = renamed(err, {"max_tokens": "options.num_predict"})
    assert (out.message, out.param, out.status, out.code) == (
        "options.num_predict: 9000 tokens do not fit", "options.num_predict", 400, "context_length_exceeded")
    nested = renamed(ApiError("steering[0].scale: bad", "validation", "steering[0].scale"),
                     {"steering": "options.steering"})
    assert nested.message == "options.steering[0].scale: bad"
    untouched = ApiError("messages: too long", "invalid_request", "messages")
    assert renamed(untouched, {"max_tokens": "x"}) is untouched
    assert json.loads(json.dumps(out.body()))["error"]["param"] == "options.num_predict"
