"""The page's condition controls in a real headless Chromium against a real `caa-local serve`:
a vector gated with the `when` menu, and the answer label saying whether the condition fired."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, pydantic) is not installed")
pytest.importorskip("playwright.sync_api", reason="playwright (dev extra) is not installed")

from conftest import CHROMIUM, needs_chromium  # noqa: E402
from caa_local.serve.testing import ServerProcess  # noqa: E402

pytestmark = [pytest.mark.slow, needs_chromium]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess("--slots", "2", "--ctx", "1024", "--threads", "1") as proc:
        yield proc


def test_when_menu_gates_a_vector_and_the_label_shows_the_decision(server: ServerProcess) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(server.url + "/")
        assert page.locator("#library li", has_text="work").locator(".badge").inner_text() == "condition"
        page.get_by_role("button", name="Add sentiment", exact=True).click()
        page.get_by_label("sentiment when").select_option("work")
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "8")
        for n, (prompt, decision) in enumerate([("How do I ask my manager for a raise?", "when work: fired"),
                                                ("What is a good recipe for banana bread?", "when work: not fired")]):
            page.fill("#prompt", prompt)
            page.press("#prompt", "Enter")
            page.wait_for_function(f"document.querySelectorAll('.turn .answer.done').length === {2 * (n + 1)}",
                                   timeout=240_000)
            steered = page.locator(".turn").nth(n).locator(".answer.steered .label").inner_text()
            assert "sentiment x+" in steered and "when work" in steered and decision in steered, steered
        assert errors == []
        browser.close()
