"""A real OTLP round trip: `streamgen serve` as its own process exports to a
receiver in this test; a request made from the browser client is found there by
its trace id with every phase, and its JSON log lines carry the same ids."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ARTIFACTS, ServerProcess, ask, open_chat
from helpers import wait_until
from otlp_receiver import OtlpReceiver

pytestmark = pytest.mark.integration

JAEGER = "http://jaeger.example:16686"
PHASES = {"tokenize", "queue", "prefill", "forward", "sample", "detokenize"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced_server(real_default_dir: Path, receiver: OtlpReceiver) -> Iterator[ServerProcess]:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "streamgen-e2e",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "STREAMGEN_JAEGER_URL": JAEGER,
        "STREAMGEN_LOG_FORMAT": "json",
    }
    server = ServerProcess(real_default_dir.parents[2], env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _wait_for(predicate, timeout: float = 15.0, what: str = "condition"):
    return wait_until(predicate, timeout, what, interval=0.1)


def test_browser_request_is_found_by_trace_id_with_every_phase(browser, traced_server, receiver) -> None:
    page = open_chat(browser, traced_server.url)
    page.wait_for_function("document.getElementById('model').textContent.includes('SmolLM2')", timeout=15000)
    ask(page, "What is the capital of France?", max_tokens=12)
    link = page.locator(".msg.assistant a.trace").last
    trace_id = link.get_attribute("data-trace-id")
    assert link.get_attribute("href") == f"{JAEGER}/trace/{trace_id}"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser-trace-link.png"))
    page.close()

    def phases():
        names = {s.name for s in receiver.spans if s.trace_id == trace_id}
        return names if PHASES <= names and any(n.startswith("chat ") for n in names) else None

    _wait_for(phases, what=f"the spans of trace {trace_id}")
    spans = [s for s in receiver.spans if s.trace_id == trace_id]
    (root,) = [s for s in spans if s.name == "chat SmolLM2-135M-Instruct"]
    assert root.service_name == "streamgen-e2e"
    assert root.attributes["gen_ai.operation.name"] == "chat"
    assert root.attributes["gen_ai.request.model"] == "SmolLM2-135M-Instruct"
    assert root.attributes["gen_ai.usage.output_tokens"] >= 1
    assert all(s.parent_span_id == root.span_id for s in spans if s is not root)
    tokens = root.attributes["gen_ai.usage.output_tokens"]
    assert sum(s.name == "detokenize" for s in spans) == tokens

    # The JSON log lines of that request carry the same trace and span ids.
    lines = [json.loads(line) for line in traced_server.output().splitlines() if line.startswith("{")]
    mine = [e for e in lines if e.get("trace_id") == trace_id]
    events = {e["event"] for e in mine}
    assert {"request.accepted", "request.first_token", "request.finished"} <= events
    assert all(e["span_id"] == root.span_id and e["request_id"] for e in mine)
    assert "What is the capital" not in json.dumps(mine), "no prompt text at info level"

    # Metrics go over OTLP as well as to /metrics.
    _wait_for(lambda: "gen_ai.server.time_to_first_token" in receiver.metric_names, what="OTLP metrics")
