"""Conditions through `caa-local serve`: `when` on a steering term (a real server process, the
openai client and raw HTTP), the answer's echo of each condition, and 4xx for bad conditions."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")
pytest.importorskip("openai", reason="the dev extra's openai client is not installed")

from caa_local.core.locate import load_vector  # noqa: E402
from caa_local.engine.engine import Engine, Sampling  # noqa: E402
from caa_local.serve.testing import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

WORK = "How do I ask my manager for a raise at my job?"
OTHER = "What is a good recipe for banana bread?"
N = 16


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--slots", "1", "--ctx", "1024", "--threads", "1") as proc:
        yield proc


def post(server: ServerProcess, prompt: str, steering: list[dict[str, Any]], stream: bool = False
         ) -> tuple[int, dict[str, Any]]:
    body = {"messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": N,
            "steering": steering, "stream": stream}
    return server.request("POST", "/v1/chat/completions", json.dumps(body).encode())


def test_when_applies_the_term_only_where_the_condition_fires(server: ServerProcess) -> None:
    engine = Engine(n_ctx=1024, n_threads=1)
    greedy = Sampling(temperature=0.0, max_tokens=N)
    plain = engine.generate([{"role": "user", "content": WORK}], greedy)  # unsteered
    engine.steer("sentiment", load_vector("sentiment")[1], 2.0)
    steered = engine.generate([{"role": "user", "content": WORK}], greedy)
    unsteered_other = Engine(engine.model, 1024, 1).generate([{"role": "user", "content": OTHER}], greedy)
    term = {"vector": "sentiment", "scale": 2.0, "when": "work"}
    status, body = post(server, WORK, [term])
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == steered.text != plain.text
    [report] = body["conditions"]
    assert report["condition"] == "work" and report["fired"] is True and isinstance(report["score"], float)
    assert body["steering"][0]["when"][0]["condition"] == "work"
    status, body = post(server, OTHER, [term])
    assert status == 200 and body["conditions"][0]["fired"] is False
    assert body["choices"][0]["message"]["content"] == unsteered_other.text
    # Inverted ("unless") and a list meaning OR, through the official client.
    client = server.client()
    reply = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": OTHER}], temperature=0, max_tokens=N,
        extra_body={"steering": [{"vector": "sentiment", "scale": 2.0,
                                  "when": [{"condition": "work", "invert": True}, "work"]}]})
    checked = reply.model_extra["conditions"]
    assert [c["fired"] for c in checked] == [True, False] and [c["invert"] for c in checked] == [True, False]


def test_stream_ends_with_the_conditions(server: ServerProcess) -> None:
    status, body = post(server, WORK, [{"vector": "sentiment", "scale": 2.0, "when": "work"}], stream=True)
    frames = [json.loads(line[6:]) for line in body["raw"].split("\n") if line.startswith("data: {")]
    finish = [f for f in frames if f["choices"] and f["choices"][0]["finish_reason"]]
    assert status == 200 and finish[0]["conditions"][0]["fired"] is True


@pytest.mark.parametrize("term, status, param", [
    ({"vector": "sentiment", "scale": 1, "when": "nosuch"}, 404, "steering[0].when[0]"),
    ({"vector": "sentiment", "scale": 1, "when": "formality"}, 400, "steering[0].when[0]"),
    ({"vector": "sentiment", "scale": 1, "when": {"condition": "work", "threshold": "NaN"}}, 422,
     "steering[0].when[0].threshold"),
    ({"vector": "sentiment", "scale": 1, "when": {"condition": "work", "typo": 1}}, 422, "steering[0].when[0].typo"),
    ({"vector": "sentiment", "scale": 1, "when": 5}, 422, "steering[0].when[0]"),
    ({"vector": "work", "scale": 1}, 400, "steering[0].vector"),
    ({"vector": "sentiment", "scale": 1, "when": ["work", "formality"]}, 400, "steering[0].when[1]"),
])
def test_bad_conditions_are_4xx(server: ServerProcess, term: dict[str, Any], status: int, param: str | None) -> None:
    got, body = post(server, WORK, [term])
    assert got == status, body
    assert "error" in body and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
