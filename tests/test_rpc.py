"""llama.cpp's RPC backend: a model whose layers all live on `caa-local rpc-worker`s steers,
scores and extracts as the local CPU engine does; bad endpoints and a lost worker get one clear
error, never an abort's backtrace or a hang.

The RPC clients run in subprocesses: llama.cpp ends a process whose worker goes away (even
while freeing a model), so the test process never holds a model on a worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from caa_local.core.datasets import load_ab
from caa_local.core.locate import load_vector
from caa_local.engine.engine import Engine, Sampling
from caa_local.engine.reads import extract
from caa_local.engine.rpc import RpcError, parse_endpoints, wait_for_worker
from caa_local.engine.scoring import choices_from_items, score_ab

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What do you think about rainy Mondays?"}]
N_TOKENS = 24
SCALE = 2.0
N_ITEMS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # however the suite was launched


def start_worker(port: int, *extra: str) -> subprocess.Popen[str]:
    worker = subprocess.Popen(
        [sys.executable, "-m", "caa_local.cli", "rpc-worker", "--port", str(port), "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), preexec_fn=default_sigint)
    try:
        wait_for_worker(worker, f"127.0.0.1:{port}")
    except RpcError as err:
        worker.kill()
        raise AssertionError(f"{err}: {worker.communicate()}") from None
    return worker


def stop(worker: subprocess.Popen[str]) -> None:
    worker.kill()
    worker.wait(10)


@pytest.fixture(scope="module")
def workers() -> Iterator[list[str]]:
    ports = [free_port(), free_port()]
    procs = [start_worker(p) for p in ports]
    try:
        yield [f"127.0.0.1:{p}" for p in ports]
    finally:
        for p in procs:
            stop(p)


CLIENT = """
import json, sys
from caa_local.core.datasets import load_ab
from caa_local.core.locate import load_vector
from caa_local.engine.engine import Engine, Sampling
from caa_local.engine.reads import extract
from caa_local.engine.scoring import choices_from_items, score_ab

rpc, prompt, n_tokens, scale, n_items = json.loads(sys.argv[1])
engine = Engine(n_ctx=1024, n_threads=1, n_gpu_layers=-1, rpc=rpc)
out = {"unsteered": engine.generate(prompt, Sampling(max_tokens=n_tokens)).tokens}
_, vector = load_vector("sentiment")
term = engine.make_term("sentiment", vector, scale)
engine.set_steering([term])
out["steered"] = engine.generate(prompt, Sampling(max_tokens=n_tokens)).tokens
items = load_ab("sentiment").items[:n_items]
scores = score_ab(engine, choices_from_items(items), [[], [term]])
out["p_match"] = [s.p_match.tolist() for s in scores]
layer = term.layers[0]
out["extracted"] = extract(engine, items, layers=[layer]).directions[layer].tolist()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def remote(workers: list[str]) -> dict[str, list]:
    """Every result of the client whose every layer sits on the two workers (split between them)."""
    args = json.dumps([workers, PROMPT, N_TOKENS, SCALE, N_ITEMS])
    done = subprocess.run([sys.executable, "-c", CLIENT, args], capture_output=True, text=True, timeout=600,
                          env=child_env(), preexec_fn=default_sigint)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def local() -> Engine:
    return Engine(n_ctx=1024, n_threads=1)


def test_greedy_answers_on_workers_equal_the_local_engines(remote: dict[str, list], local: Engine) -> None:
    # The workers run llama.cpp's CPU backend of this same build on this same CPU: the split
    # over two devices changes where each op runs, not what it computes (measured: logits
    # bitwise equal), so greedy tokens are equal, steered or not.
    assert remote["unsteered"] == local.generate(PROMPT, Sampling(max_tokens=N_TOKENS)).tokens
    _, vector = load_vector("sentiment")
    with local.steered([local.make_term("sentiment", vector, SCALE)]):
        steered = local.generate(PROMPT, Sampling(max_tokens=N_TOKENS)).tokens
    assert remote["steered"] == steered
    assert remote["steered"] != remote["unsteered"]  # the vector did reach the workers' layers


def test_ab_scores_and_extraction_on_workers_agree_with_local(remote: dict[str, list], local: Engine) -> None:
    _, vector = load_vector("sentiment")
    term = local.make_term("sentiment", vector, SCALE)
    items = load_ab("sentiment").items[:N_ITEMS]
    scores = score_ab(local, choices_from_items(items), [[], [term]])
    for got, want in zip(remote["p_match"], scores):
        np.testing.assert_allclose(got, want.p_match, rtol=0, atol=1e-3)
    layer = term.layers[0]
    want_vec = extract(local, items, layers=[layer]).directions[layer]
    got_vec = np.asarray(remote["extracted"], dtype=np.float32)
    assert np.linalg.norm(got_vec - want_vec) <= 1e-3 * np.linalg.norm(want_vec)


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "caa_local.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), preexec_fn=default_sigint)


def test_generate_on_a_worker_from_the_cli(workers: list[str]) -> None:
    done = run_cli("generate", "Say hi.", "--rpc", workers[0], "--max-tokens", "4", "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.parametrize("spec, says", [
    ("nonsense", "expected HOST:PORT"),
    ("127.0.0.1:0", "expected HOST:PORT"),
    ("127.0.0.1:99999", "expected HOST:PORT"),
])
def test_a_malformed_endpoint_is_one_error(spec: str, says: str) -> None:
    with pytest.raises(RpcError, match=says):
        parse_endpoints([spec])


def test_unreachable_and_foreign_workers_are_one_clear_error() -> None:
    refused = run_cli("generate", "hi", "--rpc", f"127.0.0.1:{free_port()}")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line
    assert "connection refused" in refused.stderr and "rpc-worker" in refused.stderr
    # Something that is not an RPC worker listens there (it closes every connection at once).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = subprocess.Popen([sys.executable, "-m", "caa_local.cli", "generate", "hi", "--rpc",
                                   f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=child_env(), preexec_fn=default_sigint)
        conn, _ = listener.accept()
        conn.close()
        _, err = client.communicate(timeout=120)
    assert client.returncode == 1 and "Traceback" not in err
    assert "not a llama.cpp RPC worker" in err


def test_a_worker_lost_mid_answer_ends_with_one_error_not_a_hang() -> None:
    port = free_port()
    worker = start_worker(port)
    try:
        client = subprocess.Popen(
            [sys.executable, "-m", "caa_local.cli", "generate", "Tell me a very long story about a dragon.",
             "--rpc", f"127.0.0.1:{port}", "--max-tokens", "4000", "--ctx", "4096", "--temperature", "1",
             "--threads", "1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), preexec_fn=default_sigint)
        first = client.stdout.read(1)  # the answer has started streaming
        assert first, client.stderr.read()
    finally:
        stop(worker)
    _, err = client.communicate(timeout=30)
    assert client.returncode == 1
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: llama.cpp stopped") and "RPC worker went away" in lines[-1], err
    assert "Traceback" not in err


def test_binding_beyond_loopback_prints_llama_cpps_warning() -> None:
    port = free_port()
    worker = subprocess.Popen([sys.executable, "-m", "caa_local.cli", "rpc-worker", "--host", "0.0.0.0",
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env(), preexec_fn=default_sigint)
    try:
        line = worker.stderr.readline()
    finally:
        stop(worker)
    assert "WARNING" in line and "no authentication" in line


def test_a_port_in_use_is_one_error(workers: list[str]) -> None:
    port = workers[0].rsplit(":", 1)[1]
    done = run_cli("rpc-worker", "--port", port, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("Error: ")


def wait_for(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_serve_answers_503_while_its_worker_is_away_and_serves_again_after() -> None:
    import httpx

    worker_port, port = free_port(), free_port()
    worker = start_worker(worker_port)
    server = subprocess.Popen([sys.executable, "-m", "caa_local.cli", "serve", "--rpc", f"127.0.0.1:{worker_port}",
                               "--port", str(port), "--threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=child_env(),
                              preexec_fn=default_sigint)
    url = f"http://127.0.0.1:{port}"
    body = {"messages": [{"role": "user", "content": "Tell me a very long story about a dragon."}],
            "max_tokens": 3000, "temperature": 1}

    def health() -> int:
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code
        except httpx.HTTPError:
            return 0

    try:
        assert wait_for(lambda: health() == 200, 120), "the server did not come up"
        ok = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200
        # The worker dies mid-answer: the open request gets a 503 within seconds, not a hang. A
        # sampled answer may end before the worker is stopped: then the round is tried again.
        for _ in range(5):
            answered = threading.Event()

            def stop_while_answering(process: subprocess.Popen[str] = worker) -> None:
                if not answered.is_set():
                    stop(process)

            timer = threading.Timer(2.0, stop_while_answering)
            with httpx.Client(timeout=30) as client:
                timer.start()
                started = time.monotonic()
                lost = client.post(f"{url}/v1/chat/completions", json=body)
            answered.set()
            timer.join()
            if lost.status_code != 200:
                break
            if worker.poll() is not None:  # stopped just as the answer ended: bring it back
                worker = start_worker(worker_port)
                assert wait_for(lambda: health() == 200, 120), "the server did not come back"
        assert lost.status_code == 503 and time.monotonic() - started < 20
        assert lost.json()["error"]["code"] == "rpc_worker_unavailable"
        # While it is away every request is a 503 in its API's shape, and the port stays open.
        away = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        assert away.status_code == 503 and away.headers["retry-after"]
        ollama = httpx.post(f"{url}/api/chat", json={"model": "x", "messages": []}, timeout=10)
        assert ollama.status_code == 503 and "error" in ollama.json()
        # The worker is back: so is the model.
        worker = start_worker(worker_port)
        assert wait_for(lambda: health() == 200, 120), "the server did not come back"
        again = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60)
        assert again.status_code == 200
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        stop(worker)
