"""`caa-local serve --parallel 2`: continuous batching (one context, a sequence per request) passes
the server tests that do not depend on separate contexts, and steers each request its own way."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")
pytest.importorskip("openai", reason="the dev extra's openai client is not installed")

from caa_local.serve.testing import ServerProcess  # noqa: E402
from test_serve import (  # noqa: E402,F401 - collected here again, against the batched server
    COMMON, CTX, KEY, ask, test_a_client_that_leaves_while_queued_frees_nothing_it_never_held,
    test_a_cut_stream_stops_its_generation_and_frees_its_slot, test_a_second_turn_reuses_the_first_turns_cached_prompt,
    test_greedy_answers_equal_engine_generate, test_health_is_public_and_models_list_the_loaded_model,
    test_openai_client_raises_its_typed_errors, test_response_echoes_the_applied_steering_and_usage,
    test_stop_string_ends_the_answer_before_it, test_stream_frames_follow_the_openai_wire_format,
    test_twenty_concurrent_requests_on_two_slots_are_all_answered)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--parallel", "2", *COMMON, api_key=KEY) as proc:
        yield proc


@pytest.fixture(scope="module")
def engine() -> Any:
    from caa_local.engine.engine import Engine

    return Engine(n_ctx=CTX, n_threads=1)


def test_concurrent_requests_are_steered_each_its_own_way(server: ServerProcess) -> None:
    settings = [[{"vector": "sentiment", "scale": 3}], [{"vector": "sentiment", "scale": -3}], []]
    together: list[str | None] = [None] * len(settings)

    def run(i: int) -> None:
        together[i] = ask(server, settings[i], stream=i % 2 == 0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(settings))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(together) and len(set(together)) == len(settings)  # three steerings, three answers
    health = server.health()
    assert health["slots"] == 2 and health["served"] >= len(settings)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_a_conditional_request_beside_the_batch_leaves_no_thread_behind(server: ServerProcess) -> None:
    """Conditional requests run beside the batch on a thread that ends with them: a lasting
    thread that has computed keeps an OpenMP team, which slows every later batch decode."""
    def threads() -> int:
        return len(os.listdir(f"/proc/{server.proc.pid}/task"))

    ask(server, [{"vector": "sentiment", "scale": 1}])  # whatever a first request starts, it has started
    before = threads()
    answer = ask(server, [{"vector": "sentiment", "scale": 2, "when": ["work"]}], prompt="Draft a memo to my team.")
    deadline = time.monotonic() + 5
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answer and threads() <= before
