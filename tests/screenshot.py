"""Regenerate docs/screenshot.png: the chat page after two real answers with code blocks.

    .venv/bin/python tests/screenshot.py

Starts `streamgen serve` on the default model and build (from the cache:
`streamgen pull` first on a fresh machine), asks two questions with the
page's default settings (what a user gets: SamplingParams' temperature,
top-p, top-k and max tokens) in headless Chromium (Debian's package) at
desktop size in light mode, and saves the page once the second answer is
done. The one setting it changes is the seed (SEED, typed into the page's
Seed field as a user would), so that the sampled answers, and the picture,
are the same on every run. The second turn shows the server reusing the
first turn's KV cache ("cached" in its figures).
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import CHROMIUM, CHROMIUM_ARGS, FINISHED, ServerProcess, ask, open_chat  # noqa: E402

from streamgen.model_files import streamgen_home  # noqa: E402

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"
QUESTIONS = ("Write a Python function that reverses a string.", "Now use it to check whether a word is a palindrome.")
VIEWPORT = {"width": 1280, "height": 1000}
SEED = 1


def fixed_seed(page) -> None:
    """The seed typed into the page's Seed field; every other setting stays at its default."""
    page.fill("#seed", str(SEED))


def main() -> int:
    server = ServerProcess(streamgen_home())
    try:
        server.wait_ready()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = open_chat(browser, server.url, viewport=VIEWPORT, color_scheme="light")
            page.wait_for_function("document.getElementById('model').textContent.includes('context')")
            fixed_seed(page)
            for question in QUESTIONS:
                ask(page, question, wait=False)
                page.wait_for_function(FINISHED, timeout=120_000)
            if page.locator(".msg.assistant .code-block").count() == 0:
                print("no answer has a code block; the screenshot would not show highlighting", file=sys.stderr)
                return 1
            page.screenshot(path=str(OUTPUT))
            browser.close()
    finally:
        server.stop()
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
