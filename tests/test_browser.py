"""The browser client in headless Chromium (Debian's package) against the real server."""

from __future__ import annotations

import time

import pytest

from conftest import API_KEY, ARTIFACTS

pytestmark = pytest.mark.integration


def _text_lengths_while_streaming(page, samples: int = 40, interval: float = 0.05) -> list[int]:
    lengths = []
    for _ in range(samples):
        lengths.append(len(page.locator(".msg.assistant .body").last.inner_text()))
        time.sleep(interval)
    return lengths


def test_chat_streams_and_stop_cancels(browser, real_server) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.goto(real_server.url + "/")
    page.wait_for_selector("#status[data-state=open]", timeout=15000)
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')", timeout=15000)

    page.fill("#max_tokens", "400")
    page.fill("#prompt", "Write a long story about a lighthouse keeper and a storm.")
    page.click("#send")
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
    page.fill("#max_tokens", "20")
    page.fill("#prompt", "Now tell me the capital of France.")
    page.click("#send")
    page.wait_for_function("document.getElementById('finish').textContent === 'stop' || "
                           "document.getElementById('finish').textContent === 'length'", timeout=20000)
    assert page.locator(".msg.assistant").count() == 2
    page.close()


def test_phone_width_layout_fits(browser, real_server) -> None:
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page.goto(real_server.url + "/")
    page.wait_for_selector("#status[data-state=open]", timeout=15000)
    page.fill("#prompt", "Say hello.")
    page.fill("#max_tokens", "12") if page.locator("#max_tokens").is_visible() else None
    page.click("#send")
    page.wait_for_function("['stop', 'length'].includes(document.getElementById('finish').textContent)", timeout=20000)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px on a phone"
    for sel in ("#prompt", "#send", "#stop", "#chat"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 + 1, sel
    page.screenshot(path=str(ARTIFACTS / "browser-phone.png"))
    page.close()


def test_reconnects_when_the_socket_drops(browser, real_server) -> None:
    page = browser.new_page()
    page.goto(real_server.url + "/")
    page.wait_for_selector("#status[data-state=open]", timeout=15000)
    page.evaluate("state.socket.close()")
    page.wait_for_selector("#status[data-state=closed]", timeout=5000)
    page.wait_for_selector("#status[data-state=open]", timeout=10000)
    page.fill("#prompt", "Hi")
    page.fill("#max_tokens", "5")
    page.click("#send")
    page.wait_for_function("['stop', 'length'].includes(document.getElementById('finish').textContent)", timeout=20000)
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
    page.fill("#max_tokens", "12")
    page.fill("#prompt", "Hello")
    page.click("#send")
    page.wait_for_function("['stop', 'length'].includes(document.getElementById('finish').textContent)", timeout=20000)
    assert int(page.locator("#tokens").inner_text()) > 0
    page.screenshot(path=str(ARTIFACTS / "browser-with-key.png"))
    page.close()
