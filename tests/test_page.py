"""The steering page in a real headless Chromium (Debian's, through Playwright's executable_path)
against a real `caa-local serve` on the default model. Any error in the browser console fails a
test, except the one network error a test provokes on purpose.

CAA_LOCAL_SCREENSHOT=PATH saves the compare view there (docs/serve-compare.png in the README).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")
pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")

from conftest import CHROMIUM, needs_chromium  # noqa: E402
from caa_local.serve.testing import ServerProcess, free_port  # noqa: E402

pytestmark = [pytest.mark.slow, needs_chromium]
KEY = "sk-page-key"
COMMON = ("--ctx", "1024", "--threads", "1")


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of `sentiment` with a calibration summary, as the calibrate command writes it."""
    from caa_local.core.locate import resolve_vector
    from caa_local.core.vector import ControlVector

    directory = tmp_path_factory.mktemp("vectors")
    curve = [{"multiplier": m, "sentiment": round(0.2 * m, 3), "fluency": 1 - 0.05 * abs(m)} for m in (-4, -2, 0, 2, 4)]
    vector = ControlVector.load(resolve_vector("sentiment")).with_metadata(
        calibration=json.dumps({"metric": "sentiment", "curve": curve, "recommended": 2}))
    vector.save(directory / "sentiment-calibrated.gguf")
    return directory


@pytest.fixture(scope="module")
def server(calibrated_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess("--slots", "2", "--vectors-dir", str(calibrated_dir), *COMMON, api_key=KEY) as proc:
        yield proc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield instance
        instance.close()


class Console:
    """Collects console errors and page errors; ``allowed`` substrings mark provoked ones."""

    def __init__(self, page: Any, allowed: tuple[str, ...] = ()) -> None:
        self.errors: list[str] = []
        self.allowed = allowed
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


def open_page(browser: Any, url: str, key: str | None) -> tuple[Any, Console, Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    console = Console(page, ("status of 401",))
    page.goto(url)
    if key is not None:
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", key)
        page.press("#key-input", "Enter")
    return page, console, context


def set_greedy(page: Any, max_tokens: int = 24) -> None:
    page.fill("#temperature", "0")
    page.fill("#max_tokens", str(max_tokens))


def test_compare_mode_streams_unsteered_and_steered_side_by_side(server: ServerProcess, browser: Any) -> None:
    page, console, context = open_page(browser, server.url + "/", KEY)
    page.get_by_role("button", name="Add sentiment", exact=True).click()
    slider = page.locator("#scale-0")
    slider.evaluate("(el) => { el.value = -2; el.dispatchEvent(new Event('input', {bubbles: true})); }")
    assert page.locator("#scale-out-0").inner_text() == "-2"
    set_greedy(page, 40)
    assert page.locator("#compare").is_checked()
    page.fill("#prompt", "How was your weekend at the lake?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.querySelectorAll('.turn .answer.done').length === 2", timeout=240_000)
    answers = page.locator(".turn .answer")
    labels = [answers.nth(i).locator(".label").inner_text() for i in range(2)]
    texts = [answers.nth(i).locator(".text").inner_text() for i in range(2)]
    assert labels[0] == "unsteered"
    assert labels[1].startswith("sentiment x-2 @ ")
    assert all(texts) and texts[0] != texts[1]
    assert page.locator("#alert").is_hidden()
    with page.expect_download() as download:
        page.click("#export")
    exported = json.loads(Path(download.value.path()).read_text())
    answers_json = exported["turns"][0]["answers"]
    assert [a["label"] for a in answers_json] == labels and [a["text"] for a in answers_json] == texts
    assert [(t["vector"], t["scale"]) for t in exported["steering"]] == [("sentiment", -2)]
    screenshot = os.environ.get("CAA_LOCAL_SCREENSHOT")
    if screenshot:
        page.evaluate("document.querySelector('aside').scrollTop = 0")
        page.screenshot(path=screenshot)
    figures = page.evaluate("""() => ({
        firstTokenMs: window.caaMetrics.firstTokenMs,
        transferred: performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))
            .filter((e) => !e.name.includes('/v1/') && !e.name.includes('/health'))
            .reduce((n, e) => n + e.encodedBodySize, 0)})""")
    figures_path = os.environ.get("CAA_LOCAL_PAGE_FIGURES")
    if figures_path:
        Path(figures_path).write_text(json.dumps(figures))
    assert figures["firstTokenMs"] > 0
    assert console.unexpected() == []
    context.close()


def test_library_shows_fit_and_the_calibration_chart(server: ServerProcess, browser: Any) -> None:
    page, console, context = open_page(browser, server.url + "/", KEY)
    item = page.locator("#library li", has_text="sentiment-calibrated")
    item.locator("svg").wait_for()
    assert "rec 2" in item.locator("svg").inner_html()
    assert "sentiment vs multiplier" in item.inner_text()
    assert page.locator("#library li", has_text="formality").locator(".badge").inner_text() == "fits"
    item.get_by_role("button", name="Add sentiment-calibrated").click()
    slider = page.locator("#scale-0")
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("-4", "4")  # the calibrated range
    page.get_by_role("button", name="Remove sentiment-calibrated").click()
    assert page.locator("#active li").count() == 0
    # every control has a label (keyboard and screen-reader use)
    unlabeled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter((el) => el.type !== 'hidden' && !el.labels?.length && !el.getAttribute('aria-label')).map((el) => el.id)""")
    assert unlabeled == []
    assert console.unexpected() == []
    context.close()


def test_a_bad_key_shows_an_error_message(server: ServerProcess, browser: Any) -> None:
    page, console, context = open_page(browser, server.url + "/", "not-the-key")
    page.wait_for_selector("#alert:not([hidden])")
    assert "invalid API key" in page.locator("#alert").inner_text()
    assert page.locator("#key-dialog[open]").count() == 1  # asked again
    assert console.unexpected() == []
    context.close()


def test_a_server_error_is_a_message_in_the_page(server: ServerProcess, browser: Any) -> None:
    page, console, context = open_page(browser, server.url + "/", KEY)
    console.allowed = ("status of 401", "status of 400")
    page.wait_for_selector("#library li")
    page.fill("#max_tokens", "100000")
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_selector("#alert:not([hidden])")
    assert "max_tokens" in page.locator("#alert").inner_text()
    assert "max_tokens" in page.locator(".answer .error").inner_text()
    assert page.locator("#send").is_enabled()
    assert console.unexpected() == []
    context.close()


def test_the_page_reconnects_after_a_server_restart(browser: Any) -> None:
    port = free_port()
    first = ServerProcess("--slots", "1", *COMMON, port=port)
    context = browser.new_context()
    page = context.new_page()
    console = Console(page, ("ERR_CONNECTION_REFUSED", "Failed to fetch"))
    try:
        page.goto(first.url + "/")
        page.wait_for_selector("#conn.ok")
        first.close()
        page.wait_for_selector("#conn.down", timeout=30_000)
        second = ServerProcess("--slots", "1", *COMMON, port=port)
        try:
            page.wait_for_selector("#conn.ok", timeout=60_000)
            page.wait_for_selector("#library li")
            set_greedy(page, 4)
            page.fill("#prompt", "Hi")
            page.press("#prompt", "Enter")
            page.wait_for_selector(".answer.done", timeout=120_000)
            assert page.locator(".answer .text").inner_text()
            assert page.locator("#alert").is_hidden()
        finally:
            second.close()
    finally:
        if first.proc.poll() is None:
            first.close()
        context.close()
    assert console.unexpected() == []
