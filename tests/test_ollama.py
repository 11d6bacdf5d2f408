"""Presets and Ollama's API as apps meet them: one real `caa-local serve` process (with a key, a
presets file, a --preset and --ollama-port), the official `ollama` and `openai` clients, the
`llm` CLI, raw HTTP for bad input, and `Engine.generate` as the reference for greedy answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")
openai = pytest.importorskip("openai", reason="the dev extra's openai client is not installed")
ollama = pytest.importorskip("ollama", reason="the dev extra's ollama client is not installed")

from caa_local.serve.testing import ServerProcess, free_port  # noqa: E402

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

pytestmark = pytest.mark.slow

KEY = "sk-ollama-test"
CTX = 1024
N = 20
PROMPT = "How was your weekend at the lake?"
MESSAGES = [{"role": "user", "content": PROMPT}]
FILE_PRESET = """[presets.calm]
description = "sentiment down, from the presets file"
steering = [{vector = "sentiment", scale = -2.5, layers = "23"}]
system = "You are a calm assistant."
options = {temperature = 0.0, max_tokens = 12}
"""


@pytest.fixture(scope="module")
def presets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "presets.toml"
    path.write_text(FILE_PRESET, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(presets_file: Path) -> Iterator[ServerProcess]:
    port = free_port()
    with ServerProcess("--slots", "2", "--ctx", str(CTX), "--threads", "1", "--presets", str(presets_file),
                       "--preset", "cheerful=sentiment:4@23", "--ollama-port", str(port), api_key=KEY) as proc:
        proc.ollama_url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
        yield proc


@pytest.fixture(scope="module")
def engine() -> Any:
    from caa_local.engine.engine import Engine

    return Engine(n_ctx=CTX, n_threads=1)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Any:
    return ollama.Client(host=server.ollama_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300)


def reference(engine: Any, terms: list[tuple[str, float, list[int] | None]], messages: list[dict[str, str]] = MESSAGES,
              max_tokens: int = N) -> str:
    """Engine.generate's greedy answer with exactly these (vector, scale, layers) terms."""
    from caa_local.core.locate import resolve_vector
    from caa_local.core.vector import ControlVector
    from caa_local.engine.engine import Sampling

    steering = [engine.make_term(f"{name}#{i}", ControlVector.load(resolve_vector(name)), scale, layers)
                for i, (name, scale, layers) in enumerate(terms)]
    with engine.steered(steering):
        return engine.generate(messages, Sampling(temperature=0, top_p=1.0, max_tokens=max_tokens)).text


def recommended(name: str, negative: bool = False) -> tuple[str, float, list[int]]:
    """The calibrated setting a vector's preset stands for, read from the vector file."""
    from caa_local.core.locate import resolve_vector
    from caa_local.core.vector import ControlVector

    vector = ControlVector.load(resolve_vector(name))
    scale = vector.negative_multiplier_limit() if negative else vector.recommended_multiplier()
    assert scale is not None and vector.recommended_layer() is not None
    return name, scale, [vector.recommended_layer()]


def openai_answer(server: ServerProcess, model: str, messages: list[dict[str, str]] = MESSAGES, **extra: Any) -> Any:
    return server.client().chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=N,
                                                   **extra)


# -- presets by model name ---------------------------------------------------------------------
def test_models_list_the_plain_model_and_every_preset(server: ServerProcess, client: Any) -> None:
    ids = [m.id for m in server.client().models.list().data]
    assert ids[0] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    # every calibrated vector at its recommended setting, and at its negative limit where it has one
    vectors = server.request("GET", "/v1/vectors")[1]["data"]
    calibrated = [v for v in vectors if v["calibration"]]
    expected = {v["id"] for v in calibrated} | {v["id"] + "-neg" for v in calibrated
                                                if v["calibration"]["negative_limit"] is not None}
    assert {"sentiment", "sentiment-neg"} <= expected and expected | {"calm", "cheerful"} <= set(ids)
    assert not {v["id"] for v in vectors if not v["calibration"]} & set(ids)  # uncalibrated: no preset
    assert server.client().models.retrieve("sentiment-neg").steering[0]["scale"] < 0
    assert server.client().models.retrieve("default").id == ids[0]
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4o")
    listed = {m.model for m in client.list().models}
    assert {"sentiment:latest", "sentiment-neg:latest", "calm:latest", "cheerful:latest",
            "SmolLM2-135M-Instruct.Q4_1.gguf:latest"} <= listed
    assert len(listed) == len(ids)
    status, tags = server.request("GET", "/api/tags")
    entry = next(m for m in tags["models"] if m["name"] == "sentiment:latest")
    assert entry["details"]["format"] == "gguf" and entry["details"]["family"] == "llama"
    assert len(entry["digest"]) == 64 and entry["size"] > 0


def test_a_preset_answers_as_engine_generate_with_its_steering(server: ServerProcess, engine: Any) -> None:
    for model, terms in (("sentiment", [recommended("sentiment")]),
                         ("sentiment-neg", [recommended("sentiment", negative=True)]),
                         ("cheerful", [("sentiment", 4.0, [23])])):
        reply = openai_answer(server, model)
        assert reply.model == model
        assert [(t["vector"], t["scale"], t["layers"]) for t in reply.steering] == [
            (name, scale, layers) for name, scale, layers in terms]
        assert reply.choices[0].message.content == reference(engine, terms), model
    plain = openai_answer(server, "default").choices[0].message.content
    assert plain == reference(engine, [])
    assert openai_answer(server, "cheerful").choices[0].message.content != plain  # x4: visibly steered


def test_explicit_steering_replaces_the_presets(server: ServerProcess, engine: Any) -> None:
    reply = openai_answer(server, "cheerful", extra_body={"steering": []})
    assert reply.steering == [] and reply.choices[0].message.content == reference(engine, [])
    aliases = ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1", "default:latest", "")
    for alias in aliases:
        assert openai_answer(server, alias).steering == []


def test_a_file_preset_brings_its_system_prompt_and_sampling(server: ServerProcess, engine: Any) -> None:
    reply = server.client().chat.completions.create(model="calm", messages=MESSAGES)  # no temperature, no max_tokens
    messages = [{"role": "system", "content": "You are a calm assistant."}, *MESSAGES]
    assert reply.choices[0].message.content == reference(engine, [("sentiment", -2.5, [23])], messages, 12)
    assert reply.usage.completion_tokens <= 12


def test_an_unknown_model_is_a_404_listing_the_names(server: ServerProcess, client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        openai_answer(server, "gpt-4o")
    message = info.value.body["message"]
    assert "'gpt-4o'" in message and "sentiment-neg" in message and "default" in message
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llama3", messages=MESSAGES, stream=False)
    assert err.value.status_code == 404 and "sentiment-neg" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:  # only :latest names a preset
        client.chat(model="sentiment:7b", messages=MESSAGES, stream=False)
    assert err.value.status_code == 404


# -- the Ollama API with the official client ---------------------------------------------------
def test_ollama_chat_equals_the_openai_path(server: ServerProcess, client: Any) -> None:
    expected = openai_answer(server, "sentiment").choices[0].message.content
    options = {"temperature": 0, "num_predict": N}
    reply = client.chat(model="sentiment", messages=MESSAGES, options=options, stream=False)
    assert reply.message.content == expected and reply.message.role == "assistant"
    assert reply.done and reply.done_reason in ("stop", "length") and reply.model == "sentiment"
    assert 0 < reply.eval_count <= N and reply.prompt_eval_count > 0
    assert reply.total_duration >= reply.eval_duration > 0 and reply.prompt_eval_duration >= 0
    chunks = list(client.chat(model="sentiment:latest", messages=MESSAGES, options=options, stream=True))
    assert "".join(c.message.content for c in chunks) == expected
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done
    assert chunks[-1].eval_count == reply.eval_count and chunks[-1].done_reason == reply.done_reason
    assert len(chunks) > 2  # streamed piece by piece


def test_ollama_generate_equals_a_one_message_chat(server: ServerProcess, client: Any) -> None:
    expected = openai_answer(server, "cheerful").choices[0].message.content
    reply = client.generate(model="cheerful", prompt=PROMPT, options={"temperature": 0, "num_predict": N},
                            stream=False)
    assert reply.response == expected and reply.done
    pieces = client.generate(model="cheerful", prompt=PROMPT, options={"temperature": 0, "num_predict": N},
                             stream=True)
    assert "".join(p.response for p in pieces) == expected


def test_steering_in_the_request_or_its_options(server: ServerProcess, client: Any, engine: Any) -> None:
    steering = [{"vector": "sentiment", "scale": -3, "layers": "20"}]
    expected = reference(engine, [("sentiment", -3.0, [20])])
    top = client.chat(model="default", messages=MESSAGES, options={"temperature": 0, "num_predict": N,
                                                                     "steering": steering}, stream=False)
    assert top.message.content == expected
    status, body = server.request("POST", "/api/chat", json.dumps({
        "model": "sentiment", "messages": MESSAGES, "stream": False, "steering": steering,
        "options": {"temperature": 0, "num_predict": N}}).encode())
    assert status == 200 and body["message"]["content"] == expected
    assert body["steering"][0]["scale"] == -3.0


def test_ollama_streams_ndjson_by_default(server: ServerProcess) -> None:
    import httpx

    body = {"model": "sentiment", "messages": MESSAGES, "options": {"temperature": 0, "num_predict": 6}}
    with httpx.Client(timeout=120) as http, http.stream(
            "POST", server.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"] is True
    last = lines[-1]
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(last[key], int) and last[key] >= 0, key
    assert last["done_reason"] == "length" and last["eval_count"] == 6
    assert last["created_at"].endswith("Z")


def test_show_version_ps_and_a_load_request(server: ServerProcess, client: Any) -> None:
    shown = client.show("sentiment-neg")
    assert shown.details.family == "llama" and "completion" in shown.capabilities
    status, raw = server.request("POST", "/api/show", json.dumps({"model": "sentiment-neg"}).encode())
    assert raw["steering"][0]["scale"] < 0
    assert client.ps().models and server.request("GET", "/api/version")[1]["version"]
    loaded = client.chat(model="sentiment", messages=[], stream=False)  # front-ends preload this way
    assert loaded.done and loaded.done_reason == "load"


def test_presets_at_once_on_two_slots_do_not_mix(server: ServerProcess, client: Any) -> None:
    models = ["sentiment", "sentiment-neg", "cheerful", "default"]
    expected = {m: openai_answer(server, m).choices[0].message.content for m in models}
    got: dict[str, Any] = {}

    def run(model: str) -> None:
        options = {"temperature": 0, "num_predict": N}
        try:
            if model == "default":  # one whole answer, the others streamed
                got[model] = client.chat(model=model, messages=MESSAGES, options=options).message.content
            else:
                got[model] = "".join(part.message.content for part in
                                     client.chat(model=model, messages=MESSAGES, options=options, stream=True))
        except Exception as err:  # noqa: BLE001 - reported below
            got[model] = err

    threads = [threading.Thread(target=run, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_a_cut_ndjson_stream_stops_its_generation(server: ServerProcess) -> None:
    import httpx

    before = idle(server)
    body = {"model": "default", "messages": [{"role": "user", "content": "Write a very long story about a ship."}],
            "options": {"temperature": 0.8, "seed": 1, "num_predict": CTX - 64}}
    with httpx.Client(timeout=120) as http, http.stream(
            "POST", server.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        first = json.loads(next(response.iter_lines()))
        assert first["done"] is False
    after = idle(server)
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["cancelled_tokens"] - before["cancelled_tokens"] < CTX - 64


def idle(server: ServerProcess) -> dict[str, Any]:
    for _ in range(600):
        health = server.health()
        if health["slots_idle"] == health["slots"]:
            return health
        time.sleep(0.1)
    raise AssertionError(f"slots never came back: {server.health()}")


# -- bad input: the same answer through both APIs ----------------------------------------------
BAD = [
    # (what, OpenAI body, Ollama /api/chat body, status, words both messages contain, Ollama's param)
    ("unknown model", {"model": "nope"}, {"model": "nope"}, 404, "no model or preset named 'nope'", None),
    ("unknown vector", {"steering": [{"vector": "nope", "scale": 1}]},
     {"steering": [{"vector": "nope", "scale": 1}]}, 404, "no vector named 'nope'", None),
    ("a path for a vector", {"steering": [{"vector": "../etc/passwd", "scale": 1}]},
     {"options": {"steering": [{"vector": "../etc/passwd", "scale": 1}]}}, 400, "is not a vector id",
     "options.steering"),
    ("layer out of range", {"steering": [{"vector": "sentiment", "scale": 1, "layers": "99"}]},
     {"steering": [{"vector": "sentiment", "scale": 1, "layers": "99"}]}, 400, "layers", None),
    ("huge scale", {"steering": [{"vector": "sentiment", "scale": 1e9}]},
     {"steering": [{"vector": "sentiment", "scale": 1e9}]}, 400, "scale: expected a finite number", None),
    ("typo in steering", {"steering": [{"vector": "sentiment", "scael": 1}]},
     {"steering": [{"vector": "sentiment", "scael": 1}]}, 422, "steering[0]", None),
    ("negative temperature", {"temperature": -1}, {"options": {"temperature": -1}}, 422,
     "greater than or equal to 0", "options.temperature"),
    ("too many tokens", {"max_tokens": 100000}, {"options": {"num_predict": 100000}}, 400, "do not fit",
     "options.num_predict"),
    ("five stop strings", {"stop": list("abcde")}, {"options": {"stop": list("abcde")}}, 400,
     "at most 4 stop strings", "options.stop"),
    ("a tool role", {"messages": [{"role": "tool", "content": "x"}]}, {"messages": [{"role": "tool", "content": "x"}]},
     422, "messages[0].role", None),
    ("tools", {"tools": [{"type": "function"}]}, {"tools": [{"type": "function"}]}, 400, "tools", None),
    ("a prompt longer than the context", {"messages": [{"role": "user", "content": "word " * 3000}]},
     {"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "the context holds", None),
]


def post(server: ServerProcess, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.request("POST", path, raw, **kw)


@pytest.mark.parametrize("what, openai_body, ollama_body, status, words, param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_the_same_answer_through_both_apis(server: ServerProcess, what: str, openai_body: dict,
                                                          ollama_body: dict, status: int, words: str,
                                                          param: str | None) -> None:
    base = {"model": "default", "messages": MESSAGES, "max_tokens": 4}
    got, body = post(server, "/v1/chat/completions", {**base, **openai_body})
    assert got == status and words in body["error"]["message"], body
    got, body = post(server, "/api/chat", {"model": "default", "messages": MESSAGES, "stream": False,
                                            "options": {"num_predict": 4}, **ollama_body})
    assert got == status and set(body) == {"error"} and isinstance(body["error"], str), body
    assert words in body["error"], body
    if param:
        assert body["error"].startswith(param), body


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/chat", b"{not json", 400, "not valid JSON"),
    ("/api/chat", b"[1]", 400, "must be a JSON object"),
    ("/api/chat", {"model": "default", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, 400,
     "images are not supported"),
    ("/api/chat", {"model": "default", "messages": MESSAGES, "format": "json"}, 400, "format"),
    ("/api/chat", {"model": "default", "messages": MESSAGES, "options": {"num_ctx": 999999}}, 400,
     "options.num_ctx: 999999 is more than"),
    ("/api/chat", {"model": "default", "messages": MESSAGES, "options": {"mirostat": 2}}, 400, "options.mirostat"),
    ("/api/chat", {"model": "default", "messages": MESSAGES, "steering": [], "options": {"steering": []}}, 400,
     "given both"),
    ("/api/chat", {"model": "default", "messages": "hi"}, 422, "messages"),
    ("/api/generate", {"model": "default", "prompt": "x", "raw": True}, 400, "raw: not supported"),
    ("/api/generate", {"model": "default", "prompt": "x", "context": [1, 2]}, 400, "context: not supported"),
    ("/api/generate", {"model": "default", "prompt": "word " * 3000}, 400, "prompt: the prompt is"),
    ("/api/pull", {"model": "llama3"}, 501, "not supported"),
    ("/api/embed", {"model": "default", "input": "x"}, 501, "not supported"),
    ("/api/nothing", {}, 404, "no such endpoint"),
])
def test_what_ollama_clients_may_send_that_caa_local_cannot_do(server: ServerProcess, path: str, body: Any,
                                                              status: int, words: str) -> None:
    got, answer = post(server, path, body)
    assert got == status and set(answer) == {"error"} and words in answer["error"], answer


def test_the_key_and_body_limit_hold_on_the_ollama_api(server: ServerProcess) -> None:
    status, body = server.request("POST", "/api/chat", json.dumps({"model": "default", "messages": MESSAGES}).encode(),
                                  key=False)
    assert status == 401 and body == {"error": "missing API key: send 'Authorization: Bearer KEY'"}
    assert server.request("GET", "/api/tags", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, body = server.request("POST", "/api/chat", b"x" * (2 << 20))
    assert status == 413 and isinstance(body["error"], str)
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=server.ollama_url).list()
    assert err.value.status_code == 401


# -- saving presets ----------------------------------------------------------------------------
def test_a_saved_preset_is_written_to_the_file_and_usable_at_once(server: ServerProcess, presets_file: Path,
                                                                  client: Any, engine: Any) -> None:
    body = {"name": "gloomy", "steering": [{"vector": "sentiment", "scale": -3, "layers": "22"}],
            "description": "saved by a test"}
    status, saved = post(server, "/v1/presets", body)
    assert status == 201 and saved["saved_to"] == presets_file.name, saved
    written = tomllib.loads(presets_file.read_text(encoding="utf-8"))["presets"]
    assert set(written) == {"calm", "gloomy"} and written["gloomy"]["steering"][0]["scale"] == -3
    assert [p.name for p in presets_file.parent.iterdir()] == [presets_file.name]  # no temporary file left
    assert post(server, "/v1/presets", body)[0] == 409
    assert post(server, "/v1/presets", {**body, "replace": True})[0] == 201
    reply = client.chat(model="gloomy", messages=MESSAGES, options={"temperature": 0, "num_predict": N}, stream=False)
    assert reply.message.content == reference(engine, [("sentiment", -3.0, [22])])
    assert "gloomy:latest" in {m.model for m in client.list().models}


@pytest.mark.parametrize("body, status, words", [
    ({"name": "default", "steering": []}, 400, "plain model"),
    ({"name": "a/b", "steering": []}, 400, "is not a preset name"),
    ({"name": "x", "steering": [{"vector": "nope", "scale": 1}]}, 404, "no vector named"),
    ({"name": "x", "steering": [], "options": {"temperature": 99}}, 400, "options.temperature"),
    ({"name": "x", "steering": [], "colour": "red"}, 422, "colour"),
    ({"steering": []}, 422, "name"),
])
def test_bad_presets_are_refused(server: ServerProcess, presets_file: Path, body: dict, status: int,
                                 words: str) -> None:
    before = presets_file.read_text(encoding="utf-8")
    got, answer = post(server, "/v1/presets", body)
    assert got == status and words in answer["error"]["message"], answer
    assert presets_file.read_text(encoding="utf-8") == before


def test_a_presets_file_edited_since_start_up_is_kept_or_left_alone(server: ServerProcess, presets_file: Path) -> None:
    before = presets_file.read_text(encoding="utf-8")
    try:
        presets_file.write_text(before + '\n[presets.by-hand]\nsteering = []\n', encoding="utf-8")
        assert post(server, "/v1/presets", {"name": "after-edit", "steering": []})[0] == 201
        assert {"by-hand", "after-edit"} <= set(tomllib.loads(presets_file.read_text(encoding="utf-8"))["presets"])
        presets_file.write_text("presets = [broken", encoding="utf-8")
        status, body = post(server, "/v1/presets", {"name": "lost", "steering": []})
        assert status == 409 and "no longer reads as a presets file" in body["error"]["message"], body
        assert str(presets_file.parent) not in body["error"]["message"]  # no server path in an answer
        assert presets_file.read_text(encoding="utf-8") == "presets = [broken"  # left for its owner to fix
    finally:
        presets_file.write_text(before, encoding="utf-8")


# -- the llm CLI picks a preset by model name --------------------------------------------------
def test_llm_cli_chooses_a_preset_by_model_name(server: ServerProcess, tmp_path: Path) -> None:
    llm = Path(sys.executable).with_name("llm")
    if not llm.exists():
        pytest.skip("the llm CLI (dev extra) is not installed")
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: caa-sentiment\n  model_name: sentiment-neg\n  api_base: {server.base_url}\n"
        "  api_key_name: caa-local\n", encoding="utf-8")
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path)}
    subprocess.run([str(llm), "keys", "set", "caa-local", "--value", KEY], env=env, check=True, timeout=120)
    run = subprocess.run([str(llm), "-m", "caa-sentiment", "--no-log", "-o", "temperature", "0",
                          "-o", "max_tokens", str(N), PROMPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    expected = openai_answer(server, "sentiment-neg").choices[0].message.content
    assert run.stdout.strip() == expected.strip()


# -- start-up errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("args, words", [
    (["--preset", "no-equals"], "expected NAME=VECTOR"),
    (["--preset", "x=sentiment:big"], "is not a number"),
    (["--presets", "presets.yaml"], "expected a .toml or .json file"),
    (["--preset", "x=nope:1"], "preset 'x' (command line): steering[0].vector: no vector named 'nope'"),
    (["--preset", "default=sentiment"], "that name is the plain model's"),
    (["--preset", "x=sentiment@0"], "steering[0].layers"),
    (["--ollama-port", "8080"], "the same as --port"),
])
def test_bad_presets_at_start_up_are_one_error_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                    args: list[str], words: str) -> None:
    from conftest import one_error, run_cli

    args = [str(tmp_path / a) if a.endswith(".yaml") else a for a in args]
    code, _, err = run_cli(capsys, "serve", "--port", "8080", "--ctx", "256", "--threads", "1", *args)
    assert words in one_error(code, err)
