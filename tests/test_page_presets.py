"""The page's presets, "copy as curl / Python" and the calibration chart, in a real headless
Chromium against a real `caa-local serve` (with a writable presets file). The copied snippets
are run for real and must answer with the steering the page shows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")
pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")
pytest.importorskip("openai", reason="the dev extra's openai client is not installed")

from conftest import CHROMIUM, needs_chromium  # noqa: E402
from caa_local.serve.testing import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.slow, needs_chromium]
KEY = "sk-page-presets"


@pytest.fixture(scope="module")
def presets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("presets") / "presets.json"  # does not exist yet: the first save makes it


@pytest.fixture(scope="module")
def server(presets_file: Path) -> Iterator[ServerProcess]:
    with ServerProcess("--ctx", "1024", "--threads", "1", "--presets", str(presets_file), api_key=KEY) as proc:
        yield proc


@pytest.fixture(scope="module")
def page(server: ServerProcess) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.goto(server.url + "/")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#presets li")
        yield page
        assert [e for e in errors if "status of 401" not in e and "status of 409" not in e] == []
        browser.close()


def test_the_chart_draws_the_behavior_and_the_guards_limit(server: ServerProcess, page: Any) -> None:
    vectors = {v["id"]: v for v in server.request("GET", "/v1/vectors")[1]["data"]}
    calibration = vectors["sentiment"]["calibration"]  # the shipped vector's real `caa.calibration`
    item = page.locator("#library li", has=page.get_by_role("button", name="Add sentiment", exact=True))
    svg = item.locator("svg")
    svg.wait_for()
    drawn = svg.locator("circle.metric-pt").evaluate_all(
        "(ns) => ns.map((n) => [Number(n.dataset.multiplier), Number(n.dataset.value)])")
    curve = sorted(calibration["curve"], key=lambda p: p["multiplier"])
    assert drawn == [[p["multiplier"], p["metric"]] for p in curve]  # the behavior, not perplexity
    ratios = svg.locator("circle.ratio-pt").evaluate_all("(ns) => ns.map((n) => Number(n.dataset.ratio))")
    assert ratios == [p["perplexity_ratio"] for p in curve]
    failed = svg.locator("circle.ratio-pt.fail").count()
    assert failed == sum(not p["passed"] for p in curve)
    assert float(svg.locator("line.limit").get_attribute("data-limit")) == calibration["guard"]["max_perplexity_ratio"]
    assert svg.locator("line[data-mark=rec]").count() == 1 and svg.locator("line[data-mark=neg]").count() == 1
    caption = item.locator("figcaption").inner_text()
    assert caption.startswith("sentiment vs multiplier") and "guard limit" in caption


def test_presets_are_listed_and_one_click_uses_one(page: Any) -> None:
    names = page.locator("#presets li").evaluate_all("(ns) => ns.map((n) => n.dataset.preset)")
    assert {"sentiment", "sentiment-neg", "formality"} <= set(names)
    page.get_by_role("button", name="Use preset sentiment-neg").click()
    assert page.locator("#active li").count() == 1
    assert page.locator("#active li strong").inner_text() == "sentiment"
    assert float(page.locator("#scale-out-0").inner_text()) < 0
    assert "sentiment-neg" in page.locator("#preset-status").inner_text()


def test_save_as_preset_writes_the_file_and_lists_it(server: ServerProcess, page: Any, presets_file: Path) -> None:
    page.get_by_role("button", name="Use preset sentiment-neg").click()
    page.fill("#system", "Answer briefly.")
    page.fill("#preset-name", "page-made")
    page.click("#save-preset")
    page.wait_for_selector("#presets li[data-preset='page-made']")
    assert "presets.json" in page.locator("#preset-status").inner_text()
    saved = json.loads(presets_file.read_text(encoding="utf-8"))["presets"]["page-made"]
    assert saved["system"] == "Answer briefly." and saved["steering"][0]["vector"] == "sentiment"
    assert "page-made" in [m.id for m in server.client().models.list().data]
    page.click("#save-preset")  # the same name again: refused, with the reason on the page
    page.wait_for_selector("#alert:not([hidden])")
    assert "exists" in page.locator("#alert").inner_text()
    page.fill("#system", "")


def run_snippet(kind: str, text: str) -> dict[str, Any] | str:
    env = {**os.environ, "CAA_LOCAL_API_KEY": KEY}
    if kind == "curl":
        out = subprocess.run(["bash", "-c", text], capture_output=True, text=True, timeout=300, env=env, check=True)
        return json.loads(out.stdout)
    out = subprocess.run([sys.executable, "-c", text], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_copy_as_curl_and_python_run_with_the_pages_steering(page: Any) -> None:
    page.get_by_role("button", name="Use preset sentiment", exact=True).click()
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "12")
    page.fill("#prompt", "Describe the weather today.")
    page.click("#copy-curl")
    curl = page.locator("#snippet").inner_text()
    assert "$CAA_LOCAL_API_KEY" in curl and KEY not in curl  # the key never lands in a clipboard
    reply = run_snippet("curl", curl)
    assert isinstance(reply, dict)
    shown = page.locator("#active li strong").inner_text(), float(page.locator("#scale-out-0").inner_text())
    assert [(t["vector"], t["scale"]) for t in reply["steering"]] == [shown]
    page.click("#copy-python")
    python = page.locator("#snippet").inner_text()
    assert "extra_body" in python
    assert run_snippet("python", python).strip() == reply["choices"][0]["message"]["content"].strip()


def test_a_presets_sampling_defaults_fill_the_settings(server: ServerProcess, page: Any) -> None:
    body = {"name": "slow-and-short", "steering": [{"vector": "formality", "scale": 1}],
            "options": {"temperature": 0.3, "max_tokens": 33, "top_k": 5}}
    assert server.request("POST", "/v1/presets", json.dumps(body).encode())[0] == 201
    page.reload()  # the key stays in sessionStorage
    page.wait_for_selector("#presets li[data-preset='slow-and-short']")
    page.get_by_role("button", name="Use preset slow-and-short").click()
    assert (page.input_value("#temperature"), page.input_value("#max_tokens")) == ("0.3", "33")
    assert page.locator("#active li strong").inner_text() == "formality"
