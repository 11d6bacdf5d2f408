"""`caa-local serve` as a user meets it: a real server process on the default model, the official
openai client, raw HTTP for the bad requests, and `Engine.generate` / `caa-local generate` as the
reference for greedy answers.
"""

from __future__ import annotations

import json
import socket
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

from caa_local.serve.testing import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "sk-test-key"
CTX = 1024
PROMPT = "How was your weekend at the lake?"
N = 24
COMMON = ("--ctx", str(CTX), "--threads", "1")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--slots", "2", *COMMON, api_key=KEY) as proc:
        yield proc


@pytest.fixture(scope="module")
def engine() -> Any:
    from caa_local.engine.engine import Engine

    return Engine(n_ctx=CTX, n_threads=1)


def ask(server: ServerProcess, steering: list[dict[str, Any]] | None, stream: bool = False,
        prompt: str = PROMPT, max_tokens: int = N, **extra: Any) -> str:
    client = server.client()
    body: dict[str, Any] = {} if steering is None else {"steering": steering}
    body.update(extra)
    messages = [{"role": "user", "content": prompt}]
    if not stream:
        reply = client.chat.completions.create(model="default", messages=messages, temperature=0,
                                               max_tokens=max_tokens, extra_body=body)
        assert reply.choices[0].finish_reason in ("stop", "length")
        return reply.choices[0].message.content or ""
    pieces = []
    for chunk in client.chat.completions.create(model="default", messages=messages, temperature=0,
                                                max_tokens=max_tokens, stream=True, extra_body=body):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces)


def reference(engine: Any, scale: float | None, prompt: str = PROMPT, max_tokens: int = N) -> str:
    from caa_local.core.vector import ControlVector
    from caa_local.core.locate import resolve_vector
    from caa_local.engine.engine import Sampling

    engine.unsteer()
    if scale is not None:
        engine.steer("sentiment", ControlVector.load(resolve_vector("sentiment")), scale)
    try:
        return engine.generate([{"role": "user", "content": prompt}], Sampling(temperature=0, max_tokens=max_tokens)).text
    finally:
        engine.unsteer()


# -- the OpenAI surface ------------------------------------------------------------------------
def test_health_is_public_and_models_list_the_loaded_model(server: ServerProcess) -> None:
    health = server.health()
    assert health["status"] == "ok" and health["slots"] == 2 and health["auth"] is True
    models = server.client().models.list()
    ids = [m.id for m in models.data]
    assert ids[0] == "SmolLM2-135M-Instruct.Q4_1.gguf"  # the plain model first, then the presets
    assert {"sentiment", "sentiment-neg"} <= set(ids[1:])


def test_vectors_endpoint_describes_the_shipped_vectors(server: ServerProcess) -> None:
    status, body = server.request("GET", "/v1/vectors")
    assert status == 200
    by_id = {v["id"]: v for v in body["data"]}
    sentiment = by_id["sentiment"]
    assert sentiment["fits"] is True and sentiment["model_hint"] == "llama"
    assert sentiment["recommended_layer"] in sentiment["layers"]
    assert isinstance(sentiment["recommended_multiplier"], float)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_greedy_answers_equal_engine_generate(server: ServerProcess, engine: Any, stream: bool) -> None:
    steered = ask(server, [{"vector": "sentiment", "scale": -2}], stream)
    unsteered = ask(server, [], stream)
    assert steered == reference(engine, -2.0)
    assert unsteered == reference(engine, None)
    assert steered != unsteered  # steering changes the answer
    assert ask(server, None, stream) == unsteered  # no --vector: the default is no steering


def test_greedy_answer_equals_caa_local_generate(server: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "gen.json"
    subprocess.run([sys.executable, "-m", "caa_local.cli", "generate", PROMPT, "--vector", "sentiment:2",
                    "--temperature", "0", "--max-tokens", str(N), "--json", str(out), *COMMON],
                   check=True, capture_output=True, timeout=300)
    cli_text = json.loads(out.read_text())["text"]
    # caa-local generate samples with the chat's repeat penalty 1.1 and top_p 0.95: ask for the same.
    assert ask(server, [{"vector": "sentiment", "scale": 2}], repeat_penalty=1.1, top_p=0.95) == cli_text


def test_response_echoes_the_applied_steering_and_usage(server: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0,
            "steering": [{"vector": "sentiment", "scale": 1.5, "layers": "20-21"},
                         {"vector": "formality", "scale": -1, "layers": [20]}], "steering_positions": "all"}
    status, reply = server.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    assert status == 200, reply
    assert [(t["vector"], t["scale"], t["layers"]) for t in reply["steering"]] == [
        ("sentiment", 1.5, [20, 21]), ("formality", -1.0, [20])]
    assert reply["steering_positions"] == "all"
    usage = reply["usage"]
    assert usage["completion_tokens"] <= 4 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_frames_follow_the_openai_wire_format(server: ServerProcess) -> None:
    import httpx

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=120) as client:
        response = client.post(server.base_url + "/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY}"})
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.text
    assert "\r" not in raw and raw.endswith("data: [DONE]\n\n")
    frames = [json.loads(block[6:]) for block in raw.split("\n\n") if block.startswith("data: {")]
    assert frames[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert all("role" not in f["choices"][0]["delta"] for f in frames[1:] if f["choices"])
    assert len({(f["id"], f["created"], f["model"]) for f in frames}) == 1
    finish = [f for f in frames if f["choices"] and f["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0]["choices"][0]["delta"] == {}
    assert frames[-1]["choices"] == [] and frames[-1]["usage"]["completion_tokens"] >= 1


def test_stop_string_ends_the_answer_before_it(server: ServerProcess) -> None:
    full = ask(server, [], max_tokens=N)
    word = full.split()[2]
    cut = ask(server, [], max_tokens=N, stop=[word])
    assert cut == full[:full.index(word)]


def test_a_second_turn_reuses_the_first_turns_cached_prompt(server: ServerProcess) -> None:
    client = server.client()
    history = [{"role": "user", "content": "Name a colour of the sea."}]
    first = client.chat.completions.create(model="default", messages=history, temperature=0, max_tokens=8,
                                           extra_body={"steering": []})
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And of the sky?"}]
    second = client.chat.completions.create(model="default", messages=history, temperature=0, max_tokens=8,
                                            extra_body={"steering": []})
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_the_key_may_come_as_x_api_key(server: ServerProcess) -> None:
    status, body = server.request("GET", "/v1/models", headers={"X-Api-Key": KEY})
    assert status == 200 and body["data"]
    assert server.request("GET", "/health", key=False)[0] == 200
    assert server.request("GET", "/", key=False)[0] != 401  # the page loads, then asks for the key


# -- concurrency ---------------------------------------------------------------------------------
def test_two_concurrent_requests_with_different_steering_equal_each_alone(server: ServerProcess) -> None:
    settings = [[{"vector": "sentiment", "scale": 2}], [{"vector": "sentiment", "scale": -2}]]
    alone = [ask(server, s) for s in settings]
    together: list[str | None] = [None, None]

    def run(i: int) -> None:
        together[i] = ask(server, settings[i], stream=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert alone[0] != alone[1]


def test_twenty_concurrent_requests_on_two_slots_are_all_answered(server: ServerProcess) -> None:
    results: dict[int, Any] = {}

    def run(i: int) -> None:
        try:
            results[i] = ask(server, [{"vector": "sentiment", "scale": (i % 5) - 2}], stream=i % 2 == 0,
                             prompt=f"Say something about the number {i}.", max_tokens=6)
        except Exception as err:  # noqa: BLE001 - collected and reported below
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(20))
    failures = {i: r for i, r in results.items() if not isinstance(r, str) or not r}
    assert not failures
    health = server.health()
    assert health["slots_idle"] == 2 and health["queued"] == 0


def wait_idle(server: ServerProcess, slots: int) -> dict[str, Any]:
    for _ in range(600):
        health = server.health()
        if health["slots_idle"] == slots:
            return health
        time.sleep(0.1)
    raise AssertionError(f"slots never came back: {server.health()}")


def test_a_cut_stream_stops_its_generation_and_frees_its_slot(server: ServerProcess) -> None:
    before = wait_idle(server, 2)
    budget = CTX - 64
    cut = []
    for _ in range(2):  # fill both slots with long answers, then leave after the first token
        stream = server.client().chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Write a very long story about a ship."}],
            temperature=0.8, seed=1, max_tokens=budget, stream=True, extra_body={"steering": []})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        cut.append(stream)
    for stream in cut:
        stream.response.close()
    after = wait_idle(server, 2)
    assert after["cancelled"] == before["cancelled"] + 2
    assert after["cancelled_tokens"] - before["cancelled_tokens"] < 2 * budget
    assert ask(server, [], max_tokens=4)  # and the next request is served


def test_a_client_that_leaves_while_queued_frees_nothing_it_never_held(server: ServerProcess) -> None:
    import httpx

    wait_idle(server, 2)
    body = {"messages": [{"role": "user", "content": "Tell me a long tale."}], "max_tokens": 200, "stream": True,
            "temperature": 0.8, "steering": []}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=120) as client:
        holders = [client.stream("POST", server.base_url + "/chat/completions", json=body, headers=headers)
                   for _ in range(2)]
        responses = [h.__enter__() for h in holders]
        for response in responses:
            next(response.iter_lines())  # both slots busy now
        with pytest.raises(httpx.ReadTimeout):
            client.post(server.base_url + "/chat/completions", json={**body, "stream": False},
                        headers=headers, timeout=0.5)  # waits in the queue, then leaves
        for h in holders:
            h.__exit__(None, None, None)
    health = wait_idle(server, 2)
    assert health["queued"] == 0
    assert ask(server, [], max_tokens=3)


# -- bad requests ---------------------------------------------------------------------------------
GOOD = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


def with_(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


BAD: list[tuple[str, str, str, bytes | None, dict[str, str], int, str | None]] = [
    # name, method, path, body, headers, status, param
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"messages": [', {}, 400, None),
    ("body not an object", "POST", "/v1/chat/completions", b"[1, 2]", {}, 400, None),
    ("no messages", "POST", "/v1/chat/completions", b"{}", {}, 422, "messages"),
    ("empty messages", "POST", "/v1/chat/completions", with_(messages=[]), {}, 422, "messages"),
    ("bad role", "POST", "/v1/chat/completions", with_(messages=[{"role": "wizard", "content": "x"}]), {}, 422,
     "messages[0].role"),
    ("content wrong type", "POST", "/v1/chat/completions", with_(messages=[{"role": "user", "content": 5}]), {},
     422, "messages[0].content"),
    ("temperature a string", "POST", "/v1/chat/completions", with_(temperature="hot"), {}, 422, "temperature"),
    ("negative max_tokens", "POST", "/v1/chat/completions", with_(max_tokens=-3), {}, 422, "max_tokens"),
    ("max_tokens beyond the context", "POST", "/v1/chat/completions", with_(max_tokens=CTX), {}, 400, "max_tokens"),
    ("prompt beyond the context", "POST", "/v1/chat/completions",
     with_(messages=[{"role": "user", "content": "word " * (CTX + 50)}]), {}, 400, "messages"),
    ("n > 1", "POST", "/v1/chat/completions", with_(n=2), {}, 400, "n"),
    ("unknown vector", "POST", "/v1/chat/completions", with_(steering=[{"vector": "nope", "scale": 1}]), {}, 404,
     "steering[0].vector"),
    ("path-like vector", "POST", "/v1/chat/completions",
     with_(steering=[{"vector": "../../etc/passwd", "scale": 1}]), {}, 400, "steering[0].vector"),
    ("absolute path vector", "POST", "/v1/chat/completions",
     with_(steering=[{"vector": "/tmp/x.gguf", "scale": 1}]), {}, 400, "steering[0].vector"),
    ("NaN scale", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "Hi"}], "steering": [{"vector": "sentiment", "scale": NaN}]}',
     {}, 422, "steering[0].scale"),
    ("Infinity scale", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "Hi"}], "steering": [{"vector": "sentiment", "scale": Infinity}]}',
     {}, 422, "steering[0].scale"),
    ("huge scale", "POST", "/v1/chat/completions", with_(steering=[{"vector": "sentiment", "scale": 1e6}]), {}, 400,
     "steering[0].scale"),
    ("layer 0", "POST", "/v1/chat/completions",
     with_(steering=[{"vector": "sentiment", "scale": 1, "layers": [0]}]), {}, 400, "steering[0].layers"),
    ("layer beyond the model", "POST", "/v1/chat/completions",
     with_(steering=[{"vector": "sentiment", "scale": 1, "layers": "999"}]), {}, 400, "steering[0].layers"),
    ("bad layer spec", "POST", "/v1/chat/completions",
     with_(steering=[{"vector": "sentiment", "scale": 1, "layers": "ten"}]), {}, 400, "steering[0].layers"),
    ("typo in a steering key", "POST", "/v1/chat/completions",
     with_(steering=[{"vector": "sentiment", "scael": 1}]), {}, 422, "steering[0].scale"),
    ("steering not a list", "POST", "/v1/chat/completions", with_(steering={"vector": "sentiment"}), {}, 422,
     "steering"),
    ("bad positions", "POST", "/v1/chat/completions", with_(steering_positions="some"), {}, 422,
     "steering_positions"),
    ("missing key", "POST", "/v1/chat/completions", with_(), {"Authorization": ""}, 401, None),
    ("wrong key", "POST", "/v1/chat/completions", with_(), {"Authorization": "Bearer nope"}, 401, None),
    ("wrong key on /v1/models", "GET", "/v1/models", None, {"X-Api-Key": "nope"}, 401, None),
    ("oversized body", "POST", "/v1/chat/completions",
     with_(messages=[{"role": "user", "content": "x" * (2 << 20)}]), {}, 413, None),
    ("unknown endpoint", "GET", "/v1/nothing", None, {}, 404, None),
    ("wrong method", "GET", "/v1/chat/completions", None, {}, 405, None),
]


@pytest.mark.parametrize(("name", "method", "path", "body", "headers", "status", "param"), BAD,
                         ids=[row[0] for row in BAD])
def test_bad_request_gets_its_status_and_an_openai_error_body(
        server: ServerProcess, name: str, method: str, path: str, body: bytes | None, headers: dict[str, str],
        status: int, param: str | None) -> None:
    got, reply = server.request(method, path, body, headers)
    assert got == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    assert server.proc.poll() is None
    ok, good = server.request("POST", "/v1/chat/completions", json.dumps(GOOD).encode())
    assert ok == 200 and good["choices"][0]["message"]["content"] is not None


def test_openai_client_raises_its_typed_errors(server: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="default", messages=[{"role": "user", "content": "x"}],
                                                extra_body={"steering": [{"vector": "nope", "scale": 1}]})
    assert "no vector named 'nope'" in str(info.value)


def test_a_body_that_lies_about_its_length_is_cut_at_the_limit(server: ServerProcess) -> None:
    # Chunked upload with no Content-Length: counted as it arrives.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\r\n".encode())
        chunk = b"x" * 65536
        try:
            for _ in range(40):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        except OSError:
            pass  # the server answered and closed before we finished
        reply = sock.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert server.health()["status"] == "ok"


# -- a server without a key ------------------------------------------------------------------
def test_without_a_key_only_loopback_host_names_are_served() -> None:
    with ServerProcess("--slots", "1", *COMMON) as proc:
        assert proc.request("GET", "/v1/models")[0] == 200
        status, body = proc.request("GET", "/v1/models", headers={"Host": "attacker.example"})
        assert status == 403 and body["error"]["type"] == "permission_error"
        assert proc.request("GET", "/", headers={"Host": "attacker.example"})[0] == 403


def test_serve_rejects_bad_options_with_one_error_line() -> None:
    result = subprocess.run([sys.executable, "-m", "caa_local.cli", "serve", "--vector", "nope", "--port", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.startswith("Error: ") and "Traceback" not in result.stderr
