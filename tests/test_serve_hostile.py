"""`caa-local serve` against hostile clients: a real server process without a key (the loopback
default docs/serve.md shows), httpx and raw sockets for what no polite client sends, a
hypothesis property test of the whole chat API, a burst on one slot, and headless Chromium for
the cross-site case.

One server process serves the module (1 slot, a queue of 8, short deadlines); the tests that need
other options (--max-queue 0, a connection cap) start one small server each.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")
httpx = pytest.importorskip("httpx", reason="the dev extra's httpx is not installed")

from conftest import CHROMIUM, needs_chromium
from caa_local.serve.testing import ServerProcess, free_port  # noqa: E402

pytestmark = pytest.mark.slow

CTX = 512
COMMON = ("--ctx", str(CTX), "--threads", "1")
DEADLINE = 2.0  # --body-timeout of the module's server
ALLOWED_PORT = free_port()  # a page on http://localhost:ALLOWED_PORT is let in by --allow-origin
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--slots", "1", "--max-queue", "8", "--body-timeout", str(DEADLINE),
                       "--allow-origin", f"http://localhost:{ALLOWED_PORT}", *COMMON) as proc:
        yield proc


def post(server: ServerProcess, body: Any, headers: dict[str, str] | None = None, timeout: float = 120,
         raw: bytes | None = None) -> httpx.Response:
    data = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.base_url + "/chat/completions", content=data, timeout=timeout,
                      headers={"Content-Type": "application/json", **(headers or {})})


def health_ms(server: ServerProcess) -> float:
    start = time.perf_counter()
    response = httpx.get(server.url + "/health", timeout=30)
    assert response.status_code == 200
    return (time.perf_counter() - start) * 1000


def wait_idle(server: ServerProcess) -> dict[str, Any]:
    for _ in range(1200):
        health = server.health()
        if health["slots_idle"] == 1 and health["queued"] == 0:
            return health
        time.sleep(0.05)
    raise AssertionError(f"the slot never came back: {server.health()}")


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert "Traceback" not in error["message"] and len(error["message"]) < 400
    return error


# -- bounded work, no 5xx -------------------------------------------------------------------------
HOSTILE: list[tuple[str, bytes, int, str | None, str | None]] = [
    # name, raw body, status, param, code
    ("layer range of millions", json.dumps({"messages": HI, "steering": [
        {"vector": "sentiment", "scale": 1, "layers": "1-3000000"}]}).encode(), 400, "steering[0].layers",
     "invalid_layers"),
    ("layer digits past int's limit", json.dumps({"messages": HI, "steering": [
        {"vector": "sentiment", "scale": 1, "layers": "1-" + "9" * 5000}]}).encode(), 422, "steering[0].layers",
     None),
    ("digits past int's limit", b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": '
     + b"9" * 5000 + b"}", 400, "max_tokens", "number_too_long"),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "Hi \\ud800 there"}]}', 400,
     "messages[0].content", "invalid_text"),
    ("deep nesting", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, None, "too_deep"),
    ("half a megabyte model", json.dumps({"messages": HI, "model": "m" * 500_000, "max_tokens": 2,
                                          "stream": True}).encode(), 422, "model", None),
    ("a long stop string", json.dumps({"messages": HI, "stop": ["x" * 100_000]}).encode(), 422, "stop", None),
    ("many stop strings", json.dumps({"messages": HI, "stop": ["x"] * 1000}).encode(), 400, "stop", None),
    ("a long vector name", json.dumps({"messages": HI, "steering": [
        {"vector": "v" * 200_000, "scale": 1}]}).encode(), 422, "steering[0].vector", None),
    ("a long layers list", json.dumps({"messages": HI, "steering": [
        {"vector": "sentiment", "scale": 1, "layers": list(range(2000))}]}).encode(), 422, "steering[0].layers",
     None),
    ("many unknown keys", json.dumps({"messages": HI, **{f"k{i}": i for i in range(5000)}}).encode(), 400, None,
     "too_many_keys"),
    ("many messages", json.dumps({"messages": HI * 4000}).encode(), 400, "messages", None),
    ("prompt beyond the context", json.dumps({"messages": [{"role": "user", "content": "word " * 2000}]}).encode(),
     400, "messages", "context_length_exceeded"),
]


@pytest.mark.parametrize(("name", "raw", "status", "param", "code"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_body_gets_a_4xx_naming_the_problem(server: ServerProcess, name: str, raw: bytes, status: int,
                                                    param: str | None, code: str | None) -> None:
    response = post(server, None, raw=raw)
    assert_error(response, status, param, code)
    assert len(response.content) < 2000  # nothing a client sent is echoed back whole
    assert server.proc.poll() is None


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/v1/presets"])
@pytest.mark.parametrize("raw", [
    b'{"model": "x", "messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'{"model": "x", "prompt": "Hi", "options": {"num_predict": ' + b"9" * 5000 + b"}}",
    b'{"model": "x", "messages": [{"role": "user", "content": "Hi \\ud800"}], "prompt": "\\udfff"}',
], ids=["deep", "digits", "surrogate"])
def test_the_other_post_endpoints_refuse_hostile_bodies_too(server: ServerProcess, path: str, raw: bytes) -> None:
    response = httpx.post(server.url + path, content=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert 400 <= response.status_code < 500, response.text[:300]
    assert "error" in response.json() and len(response.content) < 2000
    assert server.proc.poll() is None


def test_health_answers_while_hostile_requests_are_planned_and_refused(server: ServerProcess) -> None:
    """Heavy refusals (a layer range of millions, a prompt far past the context) run off the event
    loop: /health keeps answering while they are in flight, within a bound far below their cost."""
    wait_idle(server)
    idle = sorted(health_ms(server) for _ in range(10))
    heavy = [json.dumps({"messages": HI, "steering": [{"vector": "sentiment", "scale": 1,
                                                        "layers": "1-4000000"}]}).encode(),
             json.dumps({"messages": [{"role": "user", "content": "lighthouse keeper " * 45_000}]}).encode()] * 3
    statuses: list[int] = []
    durations: list[float] = []

    def send(raw: bytes) -> None:
        start = time.perf_counter()
        statuses.append(post(server, None, raw=raw).status_code)
        durations.append(time.perf_counter() - start)

    threads = [threading.Thread(target=send, args=(raw,)) for raw in heavy]
    for t in threads:
        t.start()
    during: list[float] = []
    while any(t.is_alive() for t in threads):
        during.append(health_ms(server))
        time.sleep(0.01)
    for t in threads:
        t.join()
    assert sorted(statuses) == [400] * len(heavy)
    assert during, "the heavy requests ended before /health was asked"
    # Relative bounds from this run: /health waits for no refusal (each of which takes far longer).
    assert max(during) < max(250.0, 20 * idle[len(idle) // 2]), (during, idle)
    assert max(during) < 1000 * max(durations) / 2, (during, durations)


# -- streams: status before the first byte ----------------------------------------------------------
def stream_status_and_frames(server: ServerProcess, body: dict[str, Any]) -> tuple[int, list[Any]]:
    with httpx.stream("POST", server.base_url + "/chat/completions", json={**body, "stream": True},
                      timeout=120) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, [response.json()]
        raw = response.read()  # split on LF only, as SSE does (a piece may hold U+2028)
    frames = [line[6:].decode() for line in raw.split(b"\n") if line.startswith(b"data: ")]
    return 200, [json.loads(f) if f != "[DONE]" else f for f in frames]


def test_burst_on_one_slot_gets_only_200_and_503_and_the_slot_comes_back(server: ServerProcess) -> None:
    wait_idle(server)
    results: dict[int, tuple[int, list[Any]]] = {}

    def one(i: int) -> None:
        body = {"messages": [{"role": "user", "content": f"Count to {i}."}], "max_tokens": 8, "temperature": 0,
                "steering": []}
        if i % 2:
            results[i] = stream_status_and_frames(server, body)
        else:
            response = post(server, body)
            results[i] = (response.status_code, [response.json()])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [status for status, _ in results.values()]
    assert len(results) == 40 and set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 9  # the slot and the queue of 8 at least
    for status, frames in results.values():
        if status == 503:
            assert frames[0]["error"]["code"] == "queue_full"
        elif len(frames) > 1:  # a stream: chunks, no error frame, [DONE]
            assert frames[-1] == "[DONE]" and not any("error" in f for f in frames[:-1])
            assert any(f["choices"] and f["choices"][0]["finish_reason"] for f in frames[:-1])
        else:
            assert frames[0]["choices"][0]["message"]["content"] is not None
    health = wait_idle(server)
    assert health["slots_idle"] == 1 and health["queued"] == 0


# -- the whole API, generated ---------------------------------------------------------------------
def json_values() -> Any:
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


def request_bodies() -> Any:
    """Valid bodies of every shape, and valid bodies with one or two fields replaced by anything
    (a wrong type, an out-of-range number, a hostile string, nested junk)."""
    from hypothesis import strategies as st

    anything = json_values()
    text = st.text(max_size=30)
    part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                     "content": st.one_of(text, st.lists(part, max_size=3))})
    item = st.fixed_dictionaries(
        {"vector": st.sampled_from(["sentiment", "formality"]), "scale": st.floats(-3, 3)},
        optional={"layers": st.one_of(st.sampled_from(["10", "5-8", "all", "12,14"]), st.integers(1, 25),
                                      st.lists(st.integers(1, 25), min_size=1, max_size=3))})
    valid = st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=3), "max_tokens": st.integers(1, 3)},
        optional={
            "temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "top_k": st.integers(0, 100),
            "min_p": st.floats(0, 1), "repeat_penalty": st.floats(0.5, 2), "seed": st.integers(0, 2**32 - 1),
            "stop": st.one_of(text, st.lists(text, max_size=4)), "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
            "steering": st.lists(item, max_size=2), "steering_positions": st.sampled_from(["response", "all"]),
            "model": text, "user": text,
        })
    hostile = st.one_of(
        st.sampled_from(["\ud800", "a\udfffb", "\x00", "1-3000000", "0-999999999999"]),  # lone surrogates, ...
        st.integers(4400, 6000).map(lambda n: "1-" + "9" * n),  # digits past Python's int limit
        st.integers(300, 3000).map(lambda n: "m" * n),  # past the name limits
        st.integers(10**40, 10**200))
    wrong = st.one_of(anything, hostile, st.integers(-(10**30), 10**30), st.floats(), st.text(max_size=300),
                      st.from_regex(r"[0-9]{1,9}(-[0-9]{1,9})?(,[0-9]{1,3}){0,3}", fullmatch=True),
                      st.lists(anything, max_size=5))
    fields = st.sampled_from(["messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
                              "seed", "stop", "stream", "stream_options", "steering", "steering_positions", "model",
                              "n", "logprobs", "tools", "max_completion_tokens"])

    def mutate(body: dict[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
        return {**body, **dict(changes)}

    def mutate_steering(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
        return {**body, "steering": [{"vector": "sentiment", "scale": 1, key: value}]}

    mutated = st.builds(mutate, valid, st.lists(st.tuples(fields, wrong), min_size=1, max_size=2))
    inner = st.builds(mutate_steering, valid, st.sampled_from(["vector", "scale", "layers", "scael"]), wrong)
    return st.one_of(valid, mutated, mutated, inner).map(bounded_answer)


def bounded_answer(body: dict[str, Any]) -> dict[str, Any]:
    """Keep every answer short: a valid max_tokens above 3 becomes 3 (the slot is shared)."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 3 < value < CTX:
            body[key] = 3
    return body


def raw_bodies() -> Any:
    from hypothesis import strategies as st

    dumped = request_bodies().map(lambda body: json.dumps(body).encode())
    nested = st.integers(500, 100_000).map(lambda n: b'{"messages": ' + b"[" * n + b"]" * n + b"}")
    digits = st.integers(4400, 20_000).map(lambda n: b'{"messages": [{"role": "user", "content": "Hi"}], '
                                           b'"max_tokens": ' + b"7" * n + b"}")
    return st.one_of(dumped, dumped, dumped, dumped, dumped.map(lambda raw: raw[: len(raw) // 2]),
                     st.binary(max_size=64), nested, digits)


def check_answer(response: httpx.Response, streamed: bool) -> None:
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        return
    assert response.status_code == 200
    if not streamed or not response.headers["content-type"].startswith("text/event-stream"):
        assert response.json()["choices"][0]["message"]["content"] is not None
        return
    frames = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    assert not any("error" in json.loads(f) for f in frames[:-1]), frames


@pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
def test_generated_bodies_get_2xx_or_4xx_with_a_json_body_and_health_stays_fast(server: ServerProcess) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings

    wait_idle(server)
    idle = sorted(health_ms(server) for _ in range(10))
    slowest: list[float] = []
    statuses: list[int] = []
    client = httpx.Client(timeout=120)

    @settings(max_examples=100, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(raw=raw_bodies())
    def one(raw: bytes) -> None:
        streamed = b'"stream": true' in raw
        response = client.post(server.base_url + "/chat/completions", content=raw,
                               headers={"Content-Type": "application/json"})
        check_answer(response, streamed)
        statuses.append(response.status_code)
        slowest.append(health_ms(server))

    try:
        one()
    finally:
        client.close()
    assert hypothesis is not None
    print("statuses:", {code: statuses.count(code) for code in sorted(set(statuses))})
    assert statuses.count(200) >= 5  # the generator reaches generation, not only refusals
    assert max(slowest) < max(2000.0, 50 * idle[len(idle) // 2]), (sorted(slowest)[-5:], idle)  # still answering
    assert wait_idle(server)["slots_idle"] == 1


# -- browsers ---------------------------------------------------------------------------------------
def test_a_foreign_origin_gets_403_and_nothing_runs(server: ServerProcess) -> None:
    before = wait_idle(server)["served"]
    body = json.dumps({"messages": HI, "max_tokens": 2}).encode()
    for headers in ({"Origin": "http://evil.example", "Content-Type": "application/json"},
                    {"Origin": "null", "Content-Type": "application/json"},
                    {"Origin": f"http://localhost:{ALLOWED_PORT + 1}", "Content-Type": "application/json"}):
        response = httpx.post(server.base_url + "/chat/completions", content=body, headers=headers, timeout=30)
        assert_error(response, 403, code="bad_origin")
        assert "access-control-allow-origin" not in response.headers
    # the cross-site "simple request" a form or a no-cors fetch can send: text/plain, no preflight
    response = httpx.post(server.base_url + "/chat/completions", content=body, timeout=30,
                          headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
    assert_error(response, 403, code="bad_origin")
    assert server.health()["served"] == before


def test_post_bodies_must_be_json(server: ServerProcess) -> None:
    body = json.dumps({"messages": HI, "max_tokens": 2}).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": kind} if kind else {}
        response = httpx.post(server.base_url + "/chat/completions", content=body, headers=headers, timeout=30)
        assert_error(response, 415, code="unsupported_media_type")
    ok = httpx.post(server.base_url + "/chat/completions", content=body, timeout=120,
                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_an_allowed_origin_gets_cors_and_its_preflight_answered(server: ServerProcess) -> None:
    origin = f"http://localhost:{ALLOWED_PORT}"
    preflight = httpx.request("OPTIONS", server.base_url + "/chat/completions", timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "content-type" in preflight.headers["access-control-allow-headers"].lower()
    response = post(server, {"messages": HI, "max_tokens": 2}, headers={"Origin": origin})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin


def test_the_host_check_holds_without_a_key(server: ServerProcess) -> None:
    response = httpx.get(server.url + "/v1/models", headers={"Host": "rebind.example:8080"}, timeout=30)
    assert_error(response, 403, code="bad_host")
    assert httpx.get(server.url + "/v1/models", headers={"Host": f"localhost:{server.port}"}, timeout=30
                     ).status_code == 200


def test_allow_host_names_more_hosts_and_a_public_bind_keeps_the_check() -> None:
    with ServerProcess("--host", "0.0.0.0", "--allow-host", "my-box.lan", "--slots", "1", *COMMON) as proc:
        assert httpx.get(proc.url + "/v1/models", headers={"Host": "my-box.lan:1"}, timeout=30).status_code == 200
        response = httpx.get(proc.url + "/v1/models", headers={"Host": "rebind.example"}, timeout=30)
        assert_error(response, 403, code="bad_host")


# -- browsers, for real ----------------------------------------------------------------------------


class OtherSite(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the handler's API
        body = b"<!doctype html><meta charset=utf-8><title>another site</title><p>another site</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def sites() -> Iterator[dict[str, str]]:
    """Two static sites on other origins: a foreign one, and the one --allow-origin names."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", port), OtherSite) for port in (free_port(), ALLOWED_PORT)]
    for httpd in servers:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"foreign": f"http://127.0.0.1:{servers[0].server_address[1]}/",
           "allowed": f"http://localhost:{ALLOWED_PORT}/"}
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield instance
        instance.close()


CROSS_SITE = """async (url) => {
    const body = JSON.stringify({messages: [{role: 'user', content: 'Hi'}], max_tokens: 2});
    const out = {};
    try {  // the simple request any page may send without asking: text/plain, no-cors
        await fetch(url, {method: 'POST', mode: 'no-cors', headers: {'Content-Type': 'text/plain'}, body});
        out.simple = 'sent';
    } catch (e) { out.simple = 'failed'; }
    try {
        const response = await fetch(url, {method: 'POST', headers: {'Content-Type': 'application/json'}, body});
        out.json = response.status;
        out.text = (await response.json()).choices[0].message.content;
    } catch (e) { out.json = 'blocked'; }
    return out;
}"""


@needs_chromium
def test_a_page_on_another_origin_cannot_make_the_server_generate(server: ServerProcess, browser: Any,
                                                                  sites: dict[str, str]) -> None:
    before = wait_idle(server)["served"]
    context = browser.new_context()
    page = context.new_page()
    page.goto(sites["foreign"])
    result = page.evaluate(CROSS_SITE, server.base_url + "/chat/completions")
    assert result["json"] == "blocked", result
    # a form posts across sites with no script at all
    page.set_content(f"""<form method=post enctype=text/plain action="{server.base_url}/chat/completions">
        <input name='{{"messages":[{{"role":"user","content":"Hi"}}],"max_tokens":2,"x":"' value='"}}'>
        </form>""")
    with page.expect_navigation():
        page.evaluate("document.forms[0].submit()")
    assert "bad_origin" in page.content()
    context.close()
    assert server.health()["served"] == before  # nothing was generated


@needs_chromium
def test_an_allowed_origin_and_the_servers_own_page_work_in_a_browser(server: ServerProcess, browser: Any,
                                                                      sites: dict[str, str]) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(sites["allowed"])
    result = page.evaluate(CROSS_SITE, server.base_url + "/chat/completions")
    assert result["json"] == 200 and isinstance(result["text"], str), result
    page.goto(server.url + "/")
    page.wait_for_selector("#library li")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "4")
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    page.wait_for_selector(".answer.done", timeout=120_000)
    assert page.locator(".answer .text").first.inner_text()
    assert page.locator("#alert").is_hidden()
    context.close()


# -- connections ------------------------------------------------------------------------------------
def read_response(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (TimeoutError, socket.timeout, ConnectionResetError):
        pass
    return data


def test_a_body_that_trickles_in_is_cut_at_the_deadline(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
        start = time.monotonic()
        reply = read_response(sock, 6 * DEADLINE)  # the server closes the connection after its answer
        waited = time.monotonic() - start
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"body_timeout" in reply
    assert waited < 6 * DEADLINE  # closed by the server, not by our read timeout
    assert server.health()["status"] == "ok"


@pytest.mark.parametrize("flood", ["header", "url"])
def test_a_request_line_or_headers_without_end_are_cut(server: ServerProcess, flood: str) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Flood: " if flood == "header" else b"GET /health?q="
        try:
            sock.sendall(head)
            for _ in range(256):  # 16 MiB, never a line end
                sock.sendall(b"a" * 65536)
        except OSError:
            pass  # the server answered and closed
        reply = read_response(sock, 30)
    assert reply.startswith(b"HTTP/1.1 4"), reply[:200]
    assert server.health()["status"] == "ok"


def test_a_head_that_trickles_in_is_cut_at_the_deadline(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        closed = False
        while time.monotonic() - start < 6 * DEADLINE:
            try:
                sock.sendall(b"X")  # one header byte every 0.2 s: never a whole head
            except OSError:
                closed = True
                break
            sock.settimeout(0.2)
            try:
                if sock.recv(1024) == b"":
                    closed = True
                    break
            except (TimeoutError, socket.timeout):
                pass
    assert closed, "the server kept a connection whose head never ended"
    assert server.health()["status"] == "ok"


def test_a_client_that_never_reads_holds_no_slot(server: ServerProcess) -> None:
    """A stream whose client never reads: the slot comes back when the generation ends (the answer
    waits in buffers; a write that waits past the deadline ends the response)."""
    wait_idle(server)
    body = json.dumps({"messages": [{"role": "user", "content": "Write a long story about a ship."}],
                       "max_tokens": 300, "temperature": 0.8, "seed": 3, "stream": True, "steering": [],
                       "model": "m" * 256}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    try:
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        sock.sendall(request)
        for _ in range(100):
            if server.health()["slots_idle"] == 0:
                break
            time.sleep(0.05)
        health = wait_idle(server)  # never read a byte, yet the slot is free
        assert health["slots_idle"] == 1
        ok = post(server, {"messages": HI, "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200
    finally:
        sock.close()


def test_max_queue_zero_means_no_waiting_line_and_connections_are_capped() -> None:
    with ServerProcess("--slots", "1", "--max-queue", "0", "--max-connections", "6", "--ctx", "2048",
                       "--threads", "1") as proc:
        body = {"messages": HI, "max_tokens": 2, "temperature": 0}
        assert post(proc, body).status_code == 200  # an idle slot serves at once
        long = {"messages": [{"role": "user", "content": "Write the numbers from 1 to 1000, separated by commas."}],
                "max_tokens": 1800, "temperature": 0, "stream": True}
        # The long answer holds the one slot while the others ask; should it end first (the model may
        # stop early on some CPU), the slot is free again and the round is retried.
        for _ in range(3):
            with httpx.stream("POST", proc.base_url + "/chat/completions", json=long, timeout=120) as busy:
                assert busy.status_code == 200
                next(busy.iter_lines())
                for _ in range(100):
                    if proc.health()["slots_idle"] == 0:
                        break
                    time.sleep(0.05)
                refused = post(proc, body)
                status, frames = stream_status_and_frames(proc, body)
                if proc.health()["slots_idle"] == 1 and 200 in (refused.status_code, status):
                    continue
                assert_error(refused, 503, code="queue_full")
                assert status == 503 and frames[0]["error"]["code"] == "queue_full"
                break
        else:
            raise AssertionError("the long answer never held the slot long enough")
        # connections: idle sockets up to the cap, then a request is refused with 503
        socks = [socket.create_connection(("127.0.0.1", proc.port)) for _ in range(6)]
        try:
            time.sleep(0.3)
            refused = httpx.get(proc.url + "/health", timeout=30)
            assert refused.status_code == 503
        finally:
            for s in socks:
                s.close()
        for _ in range(100):
            if httpx.get(proc.url + "/health", timeout=30).status_code == 200:
                break
            time.sleep(0.1)
        assert post(proc, body).status_code == 200


def test_a_bad_allow_origin_is_one_error_line() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "caa_local.cli", "serve", "--allow-origin", "evil.example/x",
                             "--port", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: --allow-origin 'evil.example/x': expected scheme://host[:port] (e.g. http://localhost:3000) or '*'"]
