"""The browser client in headless Chromium (Debian's package) against real server processes.

Most tests run against the real default model. Rendering tests store a
conversation in the page's localStorage and reload, as a returning user would,
so that what is rendered does not depend on what the model happens to say.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from conftest import API_KEY, ARTIFACTS, FINISHED, ServerProcess, ask, load_chat, open_chat

pytestmark = pytest.mark.integration

PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True}
DESKTOP = {"viewport": {"width": 1200, "height": 800}}
JAEGER = "http://jaeger.example:16686"

CODE = "def add(a, b):\n    return a + b"
MARKDOWN_ANSWER = f"""# Adding numbers

Use **this** function, see [the docs](https://example.com/docs):

```python
{CODE}
```

<img src="x" onerror="window.__xss = 'img'">
<script>window.__xss = 'script'</script>
<a href="javascript:window.__xss = 'href'">run</a> <a onclick="window.__xss = 'onclick'">click</a>
[or this](javascript:window.__xss='markdown-link')
<style>body {{ display: none; }}</style><p id="send" style="position: fixed; inset: 0">a fake page</p>
<button data-action="regenerate">Regenerate</button><input aria-label="a fake field">
"""


@pytest.fixture(autouse=True, scope="module")
def _artifacts() -> None:
    ARTIFACTS.mkdir(exist_ok=True)


@pytest.fixture(scope="module")
def jaeger_server(tiny_server) -> Iterator[ServerProcess]:
    """The tiny model, with a Jaeger UI configured for the page's trace links."""
    with tiny_server("--jaeger-url", JAEGER) as server:
        yield server


class Frames:
    """Every protocol message a page sends and receives over its WebSockets, parsed.

    Playwright delivers them while the test waits on the page, so read them
    after a wait.
    """

    def __init__(self, page) -> None:
        self.sent: list[dict] = []
        self.received: list[dict] = []
        page.on("websocket", self._watch)

    def _watch(self, ws) -> None:
        ws.on("framesent", lambda payload: self.sent.append(json.loads(payload)))
        ws.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def generates(self) -> list[dict]:
        return [m for m in self.sent if m["type"] == "generate"]

    def last_received(self, kind: str) -> dict:
        return [m for m in self.received if m["type"] == kind][-1]


def watched_chat(browser, url: str, **page_options):
    """A page of the browser client with a Frames recorder attached before it loads."""
    page = browser.new_page(**page_options)
    frames = Frames(page)
    load_chat(page, url)
    return page, frames


def conversation(cid: str, title: str, *turns: tuple[str, str], updated: int = 1) -> dict:
    """A stored conversation as the page keeps it: (user, answer) turns, each answer finished."""
    messages = []
    for user, answer in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": answer, "meta": {"finish": "stop", "tokens": 3}})
    return {"id": cid, "title": title, "updated": updated, "messages": messages}


def restore(page, url: str, conversations: list[dict], active: str, settings: dict | None = None) -> None:
    """Store conversations (and settings) in the page's localStorage and reload, as if kept from an earlier visit."""
    page.evaluate("""([list, active, settings]) => {
        localStorage.setItem('streamgen.conversations', JSON.stringify(list));
        localStorage.setItem('streamgen.activeConversation', active);
        localStorage.setItem('streamgen.settings', JSON.stringify(settings));
    }""", [conversations, active, settings or {}])
    load_chat(page, url)


def texts(page, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def shown_ms(text: str) -> float:
    """A duration as the page shows it ("0.4 ms", "342 ms", "3.27 s"), in milliseconds."""
    value, unit = text.split(" ")
    return float(value) * (1000 if unit == "s" else 1)


def as_shown(ms: float):
    """ms, within the page's rounding (one decimal below 10 ms, whole ms below 1 s, then seconds)."""
    return pytest.approx(ms, abs=0.06, rel=0.05)


def wait_finished(page, timeout: float = 20000) -> None:
    page.wait_for_function(FINISHED, timeout=timeout)


# ---- streaming, stop, the answer's figures -----------------------------------------------


def _text_lengths_while_streaming(page, samples: int = 40, interval: float = 0.05) -> list[int]:
    lengths = []
    for _ in range(samples):
        lengths.append(len(page.locator(".msg.assistant .body").last.inner_text()))
        time.sleep(interval)
    return lengths


def test_chat_streams_and_stop_cancels(browser, real_server) -> None:
    page = open_chat(browser, real_server.url, **DESKTOP)
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')", timeout=15000)

    ask(page, "Write a long story about a lighthouse keeper and a storm.", max_tokens=400, wait=False)
    page.wait_for_selector(".msg.assistant.streaming", timeout=10000)
    lengths = _text_lengths_while_streaming(page)
    grew = sorted(set(lengths))
    assert len(grew) >= 5, f"the answer should grow in many steps, saw lengths {grew}"
    assert page.locator("#tokens").inner_text() != "0"
    assert page.locator("#ttft").inner_text().endswith("ms")
    assert page.locator("#announcer").inner_text() == "Answering…"
    page.screenshot(path=str(ARTIFACTS / "browser-streaming.png"))

    page.click("#stop")
    page.wait_for_function("document.getElementById('finish').textContent === 'cancelled'", timeout=5000)
    assert page.locator(".msg.assistant.streaming").count() == 0
    assert "cancelled" in page.locator(".msg.assistant .meta").last.inner_text()
    assert page.locator("#announcer").inner_text().startswith("Answer cancelled")
    page.screenshot(path=str(ARTIFACTS / "browser-cancelled.png"))

    # A second turn on the same socket: the conversation continues.
    ask(page, "Now tell me the capital of France.", max_tokens=20)
    assert page.locator(".msg.assistant").count() == 2
    page.close()


def test_answer_shows_where_its_time_went(browser, real_server) -> None:
    page, frames = watched_chat(browser, real_server.url, **DESKTOP)
    ask(page, "What is the capital of France?", max_tokens=12)
    done = frames.last_received("done")
    usage, timings = done["usage"], done["timings"]

    answer = page.locator(".msg.assistant").last
    figures = dict(answer.locator(".figure").evaluate_all(
        "items => items.map(i => [i.querySelector('dt').textContent, i.querySelector('dd').textContent])"))
    assert shown_ms(figures["queue"]) == as_shown(timings["queue_ms"])
    assert shown_ms(figures["prefill"].split(" · ")[0]) == as_shown(timings["prefill_ms"])
    assert shown_ms(figures["first token"]) == as_shown(timings["time_to_first_token_ms"])
    decode_ms, decode_rate = figures["decode"].split(" · ")
    assert shown_ms(decode_ms) == as_shown(timings["total_ms"] - timings["time_to_first_token_ms"])
    assert decode_rate == f"{timings['decode_tokens_per_s']:.1f} tok/s"
    assert figures["completion"] == f"{usage['completion_tokens']} tok"
    # cached_tokens and prefill_tokens are shown when the server sends them, and only then.
    prompt = f"{usage['prompt_tokens']} tok"
    assert figures["prompt"] == (f"{prompt} · {usage['cached_tokens']} cached" if "cached_tokens" in usage else prompt)
    if "prefill_tokens" in timings:
        assert f" · {timings['prefill_tokens']} tok" in figures["prefill"], figures
    else:
        assert "tok" not in figures["prefill"], figures

    # The bar: one segment per phase, each as wide as its share of the time.
    segments = answer.locator(".timing .bar .segment").evaluate_all(
        "s => s.map(e => [e.classList[1], Number(e.style.flexGrow)])")
    assert [name for name, _ in segments if name != "other"] == ["queue", "prefill", "decode"]
    grow = dict(segments)
    assert grow["prefill"] == pytest.approx(timings["prefill_ms"])
    assert grow["decode"] == pytest.approx(timings["total_ms"] - timings["time_to_first_token_ms"])
    assert "total" in answer.locator(".timing .bar").get_attribute("aria-label")
    # Each segment says what its phase is, and so does the legend under the figures.
    titles = answer.locator(".timing .bar .segment").evaluate_all("s => s.map(e => e.title)")
    assert all(re.fullmatch(r"\w+ [\d.]+ m?s: .{12,}", t) for t in titles), titles
    legend = answer.locator(".timing details.legend")
    assert legend.locator("summary").inner_text() == "What the phases mean"
    assert [t.strip() for t in legend.locator("dt").all_text_contents()] == [name for name, _ in segments]
    assert f"seed {done['seed']}" in answer.locator(".meta").inner_text()
    answer.screenshot(path=str(ARTIFACTS / "browser-timing.png"))
    page.close()


def test_no_trace_id_without_jaeger(browser, real_server) -> None:
    page, frames = watched_chat(browser, real_server.url)
    ask(page, "Hi", max_tokens=5)
    trace_id = frames.last_received("start")["trace_id"]
    assert trace_id, "the server makes a trace id even with no exporter"
    assert page.locator(".trace").count() == 0
    assert trace_id not in page.locator("body").inner_text()
    assert "trace" not in page.locator(".msg.assistant .meta").inner_text()
    page.close()


def test_trace_link_per_answer_with_jaeger(browser, jaeger_server) -> None:
    page, frames = watched_chat(browser, jaeger_server.url, **DESKTOP)
    for prompt in ("Hello", "Again"):
        ask(page, prompt, max_tokens=4)
    trace_ids = [m["trace_id"] for m in frames.received if m["type"] == "start"]
    links = page.locator(".msg.assistant a.trace")
    assert links.count() == 2 and len(set(trace_ids)) == 2
    for i, trace_id in enumerate(trace_ids):
        link = links.nth(i)
        assert link.get_attribute("href") == f"{JAEGER}/trace/{trace_id}"
        assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")
    page.screenshot(path=str(ARTIFACTS / "browser-trace-links.png"))
    page.close()


# ---- Markdown, copy, regenerate, edit ---------------------------------------------------


def test_markdown_is_rendered_highlighted_and_sanitized(browser, real_server) -> None:
    page = open_chat(browser, real_server.url, **DESKTOP)
    stored = conversation("c1", "markdown", ("Show me <b>code</b>", MARKDOWN_ANSWER))
    restore(page, real_server.url, [stored], "c1")

    body = page.locator(".msg.assistant .body")
    assert body.locator("h1").inner_text() == "Adding numbers"
    assert body.locator("strong").inner_text() == "this"
    code = body.locator(".code-block pre code.hljs.language-python")
    assert code.inner_text() == CODE
    assert body.locator(".hljs-keyword").all_inner_texts() == ["def", "return"]
    assert body.locator(".code-head").inner_text().startswith("python")
    link = body.locator("a[href='https://example.com/docs']")
    assert link.get_attribute("target") == "_blank" and "noopener" in link.get_attribute("rel")
    # What the user typed is shown as typed.
    assert page.locator(".msg.user .body").inner_text() == "Show me <b>code</b>"

    # The model's HTML runs nothing (no script, no handler, no javascript: link), loads
    # nothing, restyles nothing, and has no controls or ids that could pass for the page's.
    assert body.locator("script, img, style, input").count() == 0
    assert body.locator("[onerror], [onclick], [style], [id], [data-action=regenerate]").count() == 0
    assert body.locator("a[href^='javascript']").count() == 0
    assert body.locator("button").all_inner_texts() == ["Copy"], "only the code block's own copy button"
    assert page.evaluate("document.getElementById('send').tagName") == "BUTTON"
    assert page.locator("body").is_visible()
    body.get_by_text("click", exact=True).click()
    body.get_by_text("run", exact=True).click()
    page.wait_for_timeout(300)  # time for an image error handler to have fired
    assert page.evaluate("window.__xss") is None
    page.screenshot(path=str(ARTIFACTS / "browser-markdown.png"))
    page.close()


def test_copy_answer_and_code(browser, real_server) -> None:
    page = open_chat(browser, real_server.url, permissions=["clipboard-read", "clipboard-write"])
    restore(page, real_server.url, [conversation("c1", "copy", ("code please", MARKDOWN_ANSWER))], "c1")
    clipboard = "navigator.clipboard.readText()"

    copy = page.get_by_role("button", name="Copy answer")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate(clipboard) == MARKDOWN_ANSWER, "the answer is copied as the model wrote it"
    assert page.locator("#announcer").inner_text() == "Copied to the clipboard."
    copy_code = page.get_by_role("button", name="Copy python code")
    copy_code.click()
    expect(copy_code).to_have_text("Copied")
    assert page.evaluate(clipboard) == CODE

    # Where navigator.clipboard refuses (plain http on a LAN address), copying a selection still works.
    page.evaluate("() => { navigator.clipboard.writeText = () => Promise.reject(new Error('not allowed')); }")
    expect(copy).to_have_text("Copy")  # back from "Copied"
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate(clipboard) == MARKDOWN_ANSWER
    page.close()


def test_regenerate_replaces_the_last_answer(browser, real_server) -> None:
    page, frames = watched_chat(browser, real_server.url)
    ask(page, "Name a fruit.", max_tokens=12)
    first_seed = frames.last_received("done")["seed"]

    page.get_by_role("button", name="Regenerate answer").click()
    wait_finished(page)
    first, again = frames.generates()
    assert again["id"] != first["id"]
    assert again["messages"] == first["messages"] == [{"role": "user", "content": "Name a fruit."}]
    assert page.locator(".msg.assistant").count() == 1, "the new answer replaces the old one"
    assert page.locator(".msg.user").count() == 1
    second_seed = frames.last_received("done")["seed"]
    assert second_seed != first_seed
    assert f"seed {second_seed}" in page.locator(".msg.assistant .meta").inner_text()
    page.close()


def test_edit_and_resend_the_last_user_turn(browser, real_server) -> None:
    page, frames = watched_chat(browser, real_server.url)
    ask(page, "Name a fruit.", max_tokens=12)

    # Escape leaves the editor without sending anything.
    page.get_by_role("button", name="Edit and resend your message").click()
    editor = page.get_by_role("textbox", name="Edit your message")
    assert editor.input_value() == "Name a fruit."
    editor.press("Escape")
    assert page.locator(".editor").count() == 0
    assert texts(page, ".msg.user .body") == ["Name a fruit."]

    page.get_by_role("button", name="Edit and resend your message").click()
    editor.fill("Name a colour.")
    editor.press("Enter")
    wait_finished(page)
    assert frames.generates()[-1]["messages"] == [{"role": "user", "content": "Name a colour."}]
    assert len(frames.generates()) == 2 and not any(m["type"] == "cancel" for m in frames.sent)
    assert texts(page, ".msg.user .body") == ["Name a colour."]
    assert page.locator(".msg.assistant").count() == 1
    assert texts(page, "#conversations .open") == ["Name a colour."], "the title follows the first message"
    page.close()


# ---- conversations -------------------------------------------------------------------------


def test_conversations_persist_switch_and_delete(browser, real_server) -> None:
    page = open_chat(browser, real_server.url, **DESKTOP)
    page.on("dialog", lambda dialog: dialog.accept())
    older = conversation("c-old", "Older chat", ("first question", "first answer"), updated=1)
    newer = conversation("c-new", "Newer chat", ("second question", "second answer"), updated=2)
    restore(page, real_server.url, [older, newer], "c-old")
    assert texts(page, "#conversations .open") == ["Newer chat", "Older chat"]
    assert page.locator("#conversations [aria-current=page]").inner_text() == "Older chat"
    assert texts(page, ".msg.user .body") == ["first question"]

    page.get_by_role("button", name="Newer chat", exact=True).click()
    assert texts(page, ".msg .body") == ["second question", "second answer"]
    page.reload()
    page.wait_for_selector("#status[data-state=open]")
    assert texts(page, ".msg .body") == ["second question", "second answer"], "the open conversation is kept"

    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    ask(page, "Say hello.", max_tokens=8)
    page.reload()
    page.wait_for_selector("#status[data-state=open]")
    assert texts(page, "#conversations .open") == ["Say hello.", "Newer chat", "Older chat"]
    assert texts(page, ".msg.user .body") == ["Say hello."]
    assert page.locator(".msg.assistant .meta").inner_text().startswith(("stop", "length"))
    page.screenshot(path=str(ARTIFACTS / "browser-conversations.png"))

    page.get_by_role("button", name="Delete conversation: Older chat").click()
    page.get_by_role("button", name="Delete conversation: Say hello.").click()  # the open one
    assert texts(page, "#conversations .open") == ["Newer chat"]
    assert texts(page, ".msg.user .body") == ["second question"], "the newest one left opens"
    page.reload()
    page.wait_for_selector("#status[data-state=open]")
    assert texts(page, "#conversations .open") == ["Newer chat"]
    page.close()


def test_two_tabs_keep_each_others_conversations(browser, real_server) -> None:
    context = browser.new_context()
    first, second = context.new_page(), context.new_page()
    for page in (first, second):
        load_chat(page, real_server.url)
    ask(first, "Say hello.", max_tokens=6)
    second.wait_for_function("document.querySelectorAll('#conversations li').length === 1")
    ask(second, "Say goodbye.", max_tokens=6)
    first.wait_for_function("document.querySelectorAll('#conversations li').length === 2")
    assert texts(first, ".msg.user .body") == ["Say hello."], "each tab keeps its own conversation open"
    first.reload()
    first.wait_for_selector("#status[data-state=open]")
    assert sorted(texts(first, "#conversations .open")) == ["Say goodbye.", "Say hello."]
    context.close()


def test_long_chats_send_truncate_and_show_the_note(browser, real_server) -> None:
    page, frames = watched_chat(browser, real_server.url, **DESKTOP)
    story = "The keeper climbed the stairs, trimmed the wick and lit the lamp again. " * 24
    turns = [(f"Tell me part {i} of the story.", story) for i in range(8)]  # ~3000 tokens: over the 2048 context
    restore(page, real_server.url, [conversation("c1", "long", *turns)], "c1")

    ask(page, "How does it end?", max_tokens=16, wait=False)
    page.wait_for_function(FINISHED + " || document.getElementById('finish').textContent.startsWith('error')",
                           timeout=120_000)  # a prompt that fills the context: seconds of prefill on a busy CPU
    assert frames.generates()[-1]["truncate"] == "oldest"
    # Needs the server's "truncate" field: until then the request ends with invalid_message.
    dropped = frames.last_received("start")["truncated_messages"]
    assert dropped > 0
    note = page.locator(".msg.assistant").last.locator(".note")
    left_out = "message was" if dropped == 1 else f"{dropped} messages were"
    assert note.inner_text() == f"The oldest {left_out} left out to fit the model's context."
    page.screenshot(path=str(ARTIFACTS / "browser-truncated.png"))
    page.close()


# ---- layout, colours, keyboard, labels --------------------------------------------------------


def test_phone_width_layout_fits(browser, real_server) -> None:
    page = open_chat(browser, real_server.url, **PHONE)
    long_line = "x = [" + ", ".join(str(i) for i in range(200)) + "]"
    stored = conversation("c1", "wide", ("show a long line", f"```python\n{long_line}\n```"))
    # The settings are a closed dialog at this width: max_tokens comes from the stored settings.
    restore(page, real_server.url, [stored], "c1", settings={"max_tokens": "24"})
    ask(page, "Repeat this word: " + "w" * 300)
    assert not page.locator("#settings").is_visible()
    placeholder = page.locator("#prompt").get_attribute("placeholder")
    assert placeholder.startswith("Ask something") and not re.search("Enter|Shift|Escape", placeholder), \
        "no keyboard hints on a phone"

    # The header is one line: its children side by side, as high as the tallest of them plus its padding.
    page.wait_for_selector("#build")
    rows = page.evaluate("""() => [...document.querySelectorAll('header > *')]
        .filter((el) => el.offsetParent !== null)
        .map((el) => { const r = el.getBoundingClientRect(); return [el.id || el.tagName, r.top, r.bottom]; })""")
    header = page.locator("header").bounding_box()
    tallest = max(bottom - top for _, top, bottom in rows)
    assert header["height"] <= tallest + 20, (header, rows)
    middles = [(top + bottom) / 2 for _, top, bottom in rows]
    assert max(middles) - min(middles) <= 4, f"the header wrapped: {rows}"
    assert {"sidebar-toggle", "H1", "model", "settings-toggle", "status"} <= {name for name, _, _ in rows}

    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways on a phone"
    for sel in ("#prompt", "#send", "#stop", "#chat", ".msg.user >> nth=-1"):
        box = page.locator(sel).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 + 1, sel
    assert page.locator("#stop").is_visible()
    code = page.locator("pre code").first
    assert code.evaluate("c => c.scrollWidth > c.clientWidth"), "a long code line scrolls inside its block"
    page.screenshot(path=str(ARTIFACTS / "browser-phone.png"))

    # The settings open as a dialog over the chat, which stays where it is.
    chat_before = page.locator("#chat").bounding_box()
    toggle = page.get_by_role("button", name="Settings", exact=True)
    assert toggle.get_attribute("aria-expanded") == "false"
    toggle.click()
    dialog = page.get_by_role("dialog", name="Settings")
    expect(dialog).to_be_visible()
    assert dialog.get_attribute("aria-modal") == "true" and toggle.get_attribute("aria-expanded") == "true"
    assert page.locator("#chat").bounding_box() == chat_before, "opening the settings moved the chat"
    panel = dialog.bounding_box()
    assert panel["y"] < chat_before["y"] + chat_before["height"] and panel["y"] + panel["height"] > chat_before["y"]
    on_top = page.evaluate("([x, y]) => document.elementFromPoint(x, y).closest('#settings') !== null",
                           [chat_before["x"] + chat_before["width"] / 2, chat_before["y"] + 40])
    assert on_top, "the settings are drawn over the chat"
    assert page.evaluate("document.activeElement.closest('#settings') !== null"), "focus moves into the dialog"
    assert page.locator("#max_tokens").input_value() == "24"
    page.screenshot(path=str(ARTIFACTS / "browser-phone-settings.png"))
    for _ in range(12):  # Tab goes round the dialog's controls
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.closest('#settings') !== null")
    page.keyboard.press("Escape")
    expect(dialog).to_be_hidden()
    assert page.evaluate("document.activeElement.id") == "settings-toggle", "focus goes back to the button"
    assert toggle.get_attribute("aria-expanded") == "false"
    assert page.locator("#finish").inner_text() != "cancelled", "Escape closed the dialog and stopped nothing"
    toggle.click()
    page.get_by_role("button", name="Close settings").click()
    expect(dialog).to_be_hidden()
    assert page.locator("#chat").bounding_box() == chat_before

    # The conversation list is a drawer here.
    assert not page.locator("#new-chat").is_visible()
    page.get_by_role("button", name="Conversations").click()
    page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    assert page.locator("#new-chat").is_visible()
    assert page.evaluate("document.activeElement.id") == "new-chat"
    page.screenshot(path=str(ARTIFACTS / "browser-phone-conversations.png"))
    page.keyboard.press("Escape")
    page.wait_for_selector("#new-chat", state="hidden")
    toggle = page.get_by_role("button", name="Conversations")
    assert toggle.get_attribute("aria-expanded") == "false"
    toggle.click()
    page.get_by_role("button", name="Close the conversation list").click()
    page.wait_for_selector("#new-chat", state="hidden")
    page.close()


def test_dark_mode_follows_the_system(browser, real_server) -> None:
    stored = [conversation("c1", "code", ("code please", MARKDOWN_ANSWER))]
    colours = {}
    for scheme in ("light", "dark"):
        page = open_chat(browser, real_server.url, color_scheme=scheme, **DESKTOP)
        restore(page, real_server.url, stored, "c1")
        colours[scheme] = page.evaluate("""() => ({
            page: getComputedStyle(document.body).backgroundColor,
            code: getComputedStyle(document.querySelector('pre code.hljs')).backgroundColor,
            keyword: getComputedStyle(document.querySelector('.hljs-keyword')).color,
        })""")
        page.screenshot(path=str(ARTIFACTS / f"browser-{scheme}.png"))
        page.close()
    assert colours["light"]["page"] == "rgb(247, 247, 248)"
    assert colours["dark"]["page"] == "rgb(20, 21, 24)"
    # highlight.js: GitHub's light theme, then its dark one.
    assert colours["light"]["code"] == "rgb(255, 255, 255)"
    assert colours["dark"]["code"] == "rgb(13, 17, 23)"
    assert colours["light"]["keyword"] != colours["dark"]["keyword"]


def test_keyboard_enter_sends_shift_enter_breaks_escape_stops(browser, real_server) -> None:
    page, frames = watched_chat(browser, real_server.url)
    assert "Shift+Enter" in page.locator("#prompt").get_attribute("placeholder"), "hints where there is a keyboard"
    page.focus("#prompt")
    page.keyboard.type("Write a long story")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("about the sea.")
    assert page.input_value("#prompt") == "Write a long story\nabout the sea."
    assert frames.generates() == []

    page.keyboard.press("Enter")
    page.wait_for_selector(".msg.assistant.streaming")
    page.wait_for_function("Number(document.getElementById('tokens').textContent) > 3")
    assert frames.generates()[0]["messages"][-1]["content"] == "Write a long story\nabout the sea."
    page.keyboard.press("Escape")
    page.wait_for_function("document.getElementById('finish').textContent === 'cancelled'", timeout=5000)
    assert [m["id"] for m in frames.sent if m["type"] == "cancel"] == [frames.generates()[0]["id"]]

    # Focus is visible when moving by keyboard.
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid"
    page.close()


def test_every_control_has_an_accessible_name(browser, real_server) -> None:
    page = open_chat(browser, real_server.url, **DESKTOP)
    restore(page, real_server.url, [conversation("c1", "labels", ("code please", MARKDOWN_ANSWER))], "c1")
    page.get_by_role("button", name="Edit and resend your message").click()  # the editor's controls too
    unnamed = page.evaluate("""() => {
        const nameOf = (el) => {
            const label = el.getAttribute('aria-label')
                || [...(el.labels || [])].map((l) => l.textContent).join(' ')
                || (el.tagName === 'BUTTON' ? el.textContent : '');
            return label.trim();
        };
        const controls = [...document.querySelectorAll('button, input, select, textarea')];
        return {count: controls.length, unnamed: controls.filter((el) => !nameOf(el)).map((el) => el.outerHTML)};
    }""")
    assert unnamed["unnamed"] == []
    assert unnamed["count"] >= 20, "every kind of control was on the page"
    assert page.locator("#announcer").get_attribute("aria-live") == "polite"
    page.close()


# ---- connection --------------------------------------------------------------------------


def test_reconnects_when_the_socket_drops(browser, real_server) -> None:
    page = browser.new_page()
    sockets = []

    def proxy(ws) -> None:  # every socket the page opens goes through the test, to the real server
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r"/v1/ws$"), proxy)
    load_chat(page, real_server.url)
    sockets[-1].close()
    page.wait_for_selector("#status[data-state=closed]", timeout=5000)
    page.wait_for_selector("#status[data-state=open]", timeout=10000)
    assert len(sockets) == 2
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


def test_timing_legend_explains_other_and_the_stats_line_survives_a_reload(browser, real_server) -> None:
    """The "other" segment and its legend, drawn from a stored answer's timings; the page-wide line shows them."""
    page = open_chat(browser, real_server.url, **DESKTOP)
    stored = conversation("c1", "timed", ("What is the capital of France?", "The capital of France is Paris."))
    stored["messages"][1]["meta"] = {
        "finish": "stop", "tokens": 7, "seed": 5,
        "usage": {"prompt_tokens": 37, "completion_tokens": 7},
        "timings": {"queue_ms": 2, "prefill_ms": 40, "time_to_first_token_ms": 50, "decode_tokens_per_s": 30.04,
                    "total_ms": 250},
    }
    older = conversation("c0", "older", ("Hi", "Hello!"), updated=0)
    restore(page, real_server.url, [older, stored], "c0")  # the newest answer is in the conversation not open
    assert [page.locator(f"#{i}").inner_text() for i in ("ttft", "tps", "tokens", "finish")] == \
        ["50 ms", "30.0", "7", "stop"], "the line shows the latest answer after a reload"

    page.get_by_role("button", name="timed", exact=True).click()
    answer = page.locator(".msg.assistant")
    other = answer.locator(".segment.other")
    assert other.evaluate("e => Number(e.style.flexGrow)") == 8  # 50 - 2 - 40 ms
    title = other.get_attribute("title")
    assert title.startswith("other 8.0 ms: ") and "first token" in title and "other requests" in title
    legend = answer.locator("details.legend")
    legend.locator("summary").click()
    assert texts(answer, ".legend dt") == ["queue", "prefill", "other", "decode"]
    explained = dict(zip(texts(answer, ".legend dt"), texts(answer, ".legend dd")))
    assert "turning it into text" in explained["other"] and "network" in legend.locator("p").inner_text()
    answer.screenshot(path=str(ARTIFACTS / "browser-timing-legend.png"))

    # A real answer's figures are there again after a reload.
    page.click("#new-chat")
    ask(page, "Hi", max_tokens=5)
    shown = [page.locator(f"#{i}").inner_text() for i in ("ttft", "tps", "tokens", "finish")]
    page.reload()
    page.wait_for_selector("#status[data-state=open]")
    assert [page.locator(f"#{i}").inner_text() for i in ("ttft", "tps", "tokens", "finish")] == shown
    page.close()


def test_header_names_the_build_in_words(browser, real_server) -> None:
    page = open_chat(browser, real_server.url, **DESKTOP)
    build = page.locator("#build")
    expect(build).to_have_text("fp32")  # the default build: not quantized, fp32 throughout
    assert "not quantized" in build.get_attribute("title") and "streamgen pull --quantize none" in build.get_attribute("title")
    assert " none " not in page.locator("#model").inner_text()
    cases = page.evaluate("""async () => {
        const { describeBuild } = await import('/static/build.js');
        return [
            {quantization: 'int8', precision: 'fp32', kv_cache: 'auto'},
            {quantization: 'int8', precision: 'fp32', kv_cache: 'int8'},
            {quantization: 'none', precision: 'fp16', kv_cache: 'auto'},
            {quantization: 'int4', precision: 'fp16', kv_cache: 'auto'},
            {quantization: 'source', precision: 'fp32', kv_cache: 'auto'},
        ].map((b) => describeBuild(b).label);
    }""")
    assert cases == ["int8 weights", "int8 weights · int8 KV", "fp16", "int4 weights · fp16", "GGUF-level weights"]
    page.close()


def test_page_defaults_are_the_servers() -> None:
    """The page's sliders start at SamplingParams' defaults, which the API uses too."""
    from pathlib import Path

    from streamgen.engine.params import DEFAULT_MAX_TOKENS, SamplingParams

    html = (Path(__file__).resolve().parent.parent / "streamgen/server/static/index.html").read_text()

    def initial(field: str) -> float:
        return float(re.search(rf'<input id="{field}"[^>]*value="([^"]+)"', html).group(1))

    defaults = SamplingParams()
    assert initial("temperature") == defaults.temperature
    assert initial("top_p") == defaults.top_p
    assert initial("top_k") == defaults.top_k
    assert initial("max_tokens") == DEFAULT_MAX_TOKENS
    for field in ("temperature", "top_p"):
        assert float(re.search(rf'<output id="{field}-value"[^>]*>([^<]+)<', html).group(1)) == initial(field)


def test_settings_keep_only_what_the_user_changed(browser, real_server) -> None:
    """A new server default reaches a returning user who never chose that setting, old full stores included."""
    page, frames = watched_chat(browser, real_server.url, **DESKTOP)
    old_page_store = {"system": "", "temperature": "0.7", "top_p": "1", "top_k": "0", "max_tokens": "256", "seed": ""}
    restore(page, real_server.url, [], "none", settings=old_page_store)
    assert [page.input_value(f"#{i}") for i in ("temperature", "top_p")] == ["0.1", "0.5"], "the old defaults dropped"
    ask(page, "Hi", max_tokens=4)
    params = frames.generates()[-1]["params"]
    assert params["temperature"] == 0.1 and params["top_p"] == 0.5 and params["max_tokens"] == 4
    stored = page.evaluate("JSON.parse(localStorage.getItem('streamgen.settings'))")
    assert stored == {"max_tokens": "4"}, "only what differs from the defaults is kept"

    restore(page, real_server.url, [], "none", settings={"temperature": "0.9", "top_p": "1"})
    assert [page.input_value(f"#{i}") for i in ("temperature", "top_p")] == ["0.9", "1"], "a choice is kept"
    page.click("#reset-settings")
    assert page.evaluate("JSON.parse(localStorage.getItem('streamgen.settings'))") == {}
    assert page.locator("#temperature-value").inner_text() == "0.1"
    page.close()
