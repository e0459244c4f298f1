"""Shared fixtures, and the test tiers.

Every test lands in exactly one tier, from the fixtures it uses (so the tiers
cannot drift from what the tests need):
- `unit`: no model and no export; runs without torch (`pytest -m unit`
  forbids importing it) in seconds;
- `tiny`: the tiny model, which the suite builds and exports itself, or the
  export toolchain;
- `integration`: the real default model.

- `tiny_model_dir` / `tiny_plain_dir`: a tiny random Llama built and pulled
  (exported with Optimum through streamgen's own pipeline, as the
  GroupQueryAttention graph and as the plain graph) once per test session.
- `real_model_dir`: the default model, pulled once into the cache
  ($STREAMGEN_HOME or ~/.cache/streamgen) and reused across sessions.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import quiet  # noqa: E402
from tiny import build_tiny_llama  # noqa: E402

from streamgen.bench.common import ServeProcess  # noqa: E402
from streamgen.engine.device import Device  # noqa: E402
from streamgen.engine.loader import LoadedModel, load_model  # noqa: E402
from streamgen.model_files import DEFAULT_MODEL, DEFAULT_QUANTIZATION, Build, CacheLayout, streamgen_home  # noqa: E402
from streamgen.models.pull import pull  # noqa: E402

CPU = Device("cpu")

REAL_FIXTURES = {"real_cache", "real_model_dir", "real_default_dir", "real_plain_dir", "real_model", "real_server"}
TINY_FIXTURES = {"tiny_hf_dir", "tiny_cache", "tiny_model_dir", "tiny_plain_dir", "tiny_model", "keyed_server",
                 "tiny_build_dir", "tiny_server"}
# The export toolchain: what the unit tier must run without.
TOOLCHAIN = ("torch", "transformers", "optimum", "onnx", "gguf", "accelerate")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The real models from the package index (tests/test_real_models.py, `make real-models`) run only when asked
    # for by their marker: they download and convert gigabytes.
    if "real_models" not in config.option.markexpr:
        chosen = [item for item in items if not item.get_closest_marker("real_models")]
        if len(chosen) != len(items):
            config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("real_models")])
            items[:] = chosen
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & REAL_FIXTURES or item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)
        elif used & TINY_FIXTURES or item.get_closest_marker("tiny"):
            item.add_marker(pytest.mark.tiny)
        else:
            item.add_marker(pytest.mark.unit)


class _NoToolchain:
    """An import hook that makes the export toolchain unimportable (the unit tier's promise)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in TOOLCHAIN:
            raise ModuleNotFoundError(f"{name} is not importable in the unit tier, which runs without the export "
                                      "toolchain", name=name)
        return None


def pytest_configure(config: pytest.Config) -> None:
    if config.option.markexpr.strip() == "unit":
        sys.meta_path.insert(0, _NoToolchain())


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-hf"))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> CacheLayout:
    return CacheLayout(tmp_path_factory.mktemp("streamgen-home"))


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_hf_dir: Path, tiny_cache: CacheLayout) -> Path:
    """The tiny model's default build: the GroupQueryAttention graph."""
    return pull(str(tiny_hf_dir), "none", tiny_cache, quiet())


@pytest.fixture(scope="session", params=["fp32", "fp16", "int8 KV"])
def tiny_build_dir(request: pytest.FixtureRequest, tiny_hf_dir: Path, tiny_cache: CacheLayout,
                   tiny_model_dir: Path) -> Path:
    """The tiny model's GQA build in each number format the slots hold: fp32, fp16 (what CUDA serves), and fp32
    activations with an int8 KV cache."""
    build = {"fp32": Build("none"), "fp16": Build("none", "fp16"), "int8 KV": Build("none", kv_cache="int8")}
    return pull(str(tiny_hf_dir), build[request.param], tiny_cache, quiet())


@pytest.fixture(scope="session")
def tiny_plain_dir(tiny_hf_dir: Path, tiny_cache: CacheLayout) -> Path:
    """The tiny model through Optimum's plain export."""
    return pull(str(tiny_hf_dir), "none", tiny_cache, quiet(), graph="plain")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir, CPU)


@pytest.fixture(scope="session")
def real_cache() -> CacheLayout:
    return CacheLayout(streamgen_home())


@pytest.fixture(scope="session")
def real_model_dir(real_cache: CacheLayout) -> Path:
    return pull(DEFAULT_MODEL, "none", real_cache)


@pytest.fixture(scope="session")
def real_default_dir(real_cache: CacheLayout, real_model_dir: Path) -> Path:
    """The build `streamgen serve` uses by default (GQA graph, DEFAULT_QUANTIZATION)."""
    return pull(DEFAULT_MODEL, DEFAULT_QUANTIZATION, real_cache)


@pytest.fixture(scope="session")
def real_plain_dir(real_cache: CacheLayout) -> Path:
    return pull(DEFAULT_MODEL, "none", real_cache, graph="plain")


@pytest.fixture(scope="session")
def real_model(real_model_dir: Path) -> LoadedModel:
    return load_model(real_model_dir, CPU)


class ServerProcess(ServeProcess):
    """`streamgen serve` for tests: the given cache, output kept for assertions, no rate limit."""

    def __init__(self, home: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.log = tempfile.TemporaryFile("w+")
        # Every test client comes from 127.0.0.1: no per-address rate limit unless a test sets one.
        super().__init__("test", ["--home", str(home), "--rate-limit", "0", *extra], env=env, output=self.log)

    def _details(self) -> str:
        return ": " + self.output()[-4000:]

    def output(self) -> str:
        """Everything the server printed, also after it was stopped."""
        if self.log.closed:
            return self._printed
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stats(self) -> dict:
        import httpx

        return httpx.get(self.url + "/v1/stats", timeout=5).json()

    def stop(self) -> None:
        super().stop()
        if not self.log.closed:
            self._printed = self.output()
            self.log.close()


@pytest.fixture(scope="session")
def real_server(real_default_dir: Path) -> Iterator[ServerProcess]:
    """`streamgen serve` with its defaults."""
    server = ServerProcess(real_default_dir.parents[2])
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a sandboxed root CI machine with no network beyond loopback.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


# Module scope: Playwright's sync API keeps an event loop running while it is
# open, which would stop other modules' tests from calling asyncio.run().
@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing; `make test` installs it with apt-get")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()




API_KEY = "test-api-key_0123456789"


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path, tiny_cache: CacheLayout, tiny_hf_dir: Path) -> Iterator:
    """Start `streamgen serve` on the tiny model with extra flags, ready: tiny_server("--api-key", KEY). A server
    is stopped when the `with` block around it ends, or at the end of the session."""
    started: list[ServerProcess] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> ServerProcess:
        server = ServerProcess(tiny_cache.home, "--model", str(tiny_hf_dir), "--quantize", "none", *extra, env=env)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def keyed_server(tiny_server) -> Iterator[ServerProcess]:
    """The tiny model behind an API key."""
    with tiny_server("--api-key", API_KEY) as server:
        yield server


FINISHED = "['stop', 'length'].includes(document.getElementById('finish').textContent)"


def open_chat(browser, url: str, **page_options):
    """The browser client at url in a new page (and browser context), once its socket is open."""
    page = browser.new_page(**page_options)
    load_chat(page, url)
    return page


def load_chat(page, url: str) -> None:
    """Load the browser client at url into page and wait for its socket to open."""
    page.goto(url + "/")
    page.wait_for_selector("#status[data-state=open]", timeout=15000)


def ask(page, prompt: str, max_tokens: int | None = None, wait: bool = True) -> None:
    """Type a prompt into the browser client and send it; by default wait for the answer to finish."""
    if max_tokens is not None:
        page.fill("#max_tokens", str(max_tokens))
    page.fill("#prompt", prompt)
    page.click("#send")
    if wait:
        page.wait_for_function(FINISHED, timeout=20000)
