"""The browser client in headless Chromium (Debian's package) against the real server."""

from __future__ import annotations

import time

import pytest

from conftest import API_KEY, ARTIFACTS, ask, open_chat

pytestmark = pytest.mark.integration


def _text_lengths_while_streaming(page, samples: int = 40, interval: float = 0.05) -> list[int]:
    lengths = []
    for _ in range(samples):
        lengths.append(len(page.locator(".msg.assistant .body").last.inner_text()))
        time.sleep(interval)
    return lengths


def test_chat_streams_and_stop_cancels(browser, real_server) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = open_chat(browser, real_server.url, viewport={"width": 1100, "height": 760})
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')", timeout=15000)

    ask(page, "Write a long story about a lighthouse keeper and a storm.", max_tokens=400, wait=False)
    page.wait_for_selector(".msg.assistant.streaming", timeout=10000)
    lengths = _text_lengths_while_streaming(page)
    grew = sorted(set(lengths))
    assert len(grew) >= 5, f"the answer should grow in many steps, saw lengths {grew}"
    assert page.locator("#tokens").inner_text() != "0"
    assert page.locator("#ttft").inner_text().endswith("ms")
    page.screenshot(path=str(ARTIFACTS / "browser-streaming.png"))

    page.click("#stop")
    page.wait_for_function("document.getElementById('finish').textContent === 'cancelled'", timeout=5000)
    assert page.locator(".msg.assistant.streaming").count() == 0
    assert "cancelled" in page.locator(".msg.assistant .meta").last.inner_text()
    page.screenshot(path=str(ARTIFACTS / "browser-cancelled.png"))

    # A second turn on the same socket: the conversation continues.
    ask(page, "Now tell me the capital of France.", max_tokens=20)
    assert page.locator(".msg.assistant").count() == 2
    page.close()


def test_phone_width_layout_fits(browser, real_server) -> None:
    page = open_chat(browser, real_server.url, viewport={"width": 390, "height": 844}, device_scale_factor=2,
                     is_mobile=True)
    ask(page, "Say hello.")  # the settings are folded away at this width
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px on a phone"
    for sel in ("#prompt", "#send", "#stop", "#chat"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 + 1, sel
    page.screenshot(path=str(ARTIFACTS / "browser-phone.png"))
    page.close()


def test_reconnects_when_the_socket_drops(browser, real_server) -> None:
    page = open_chat(browser, real_server.url)
    page.evaluate("state.socket.close()")
    page.wait_for_selector("#status[data-state=closed]", timeout=5000)
    page.wait_for_selector("#status[data-state=open]", timeout=10000)
    ask(page, "Hi", max_tokens=5)
    page.close()


def test_browser_client_works_with_a_key(browser, keyed_server) -> None:
    page = browser.new_page()
    page.goto(keyed_server.url + "/")
    page.wait_for_selector("#key-form:not([hidden])", timeout=10000)
    assert page.locator("#status").get_attribute("data-state") != "open", "no key, no socket"
    page.fill("#api-key", API_KEY)
    page.click("#save-key")
    page.wait_for_selector("#status[data-state=open]", timeout=10000)
    page.wait_for_function("document.getElementById('model').textContent.includes('context')", timeout=10000)
    ask(page, "Hello", max_tokens=12)
    assert int(page.locator("#tokens").inner_text()) > 0
    page.screenshot(path=str(ARTIFACTS / "browser-with-key.png"))
    page.close()
