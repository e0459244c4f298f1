"""Traces, metrics and logs of real requests through the app, on the tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from starlette.testclient import TestClient

from streamgen.config import Settings
from streamgen.engine.engine import Engine
from streamgen.engine.loader import LoadedModel, load_model
from streamgen.server.app import create_app
from streamgen.telemetry.setup import Telemetry

from conftest import CPU
from helpers import BreakableRunner, collect, wait_ready

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def _telemetry(exporter: InMemorySpanExporter, detail: str = "token") -> Telemetry:
    # An exporter-less environment plus an in-memory processor: spans are sampled and kept.
    return Telemetry.from_env(detail=detail, env={}, span_processors=[SimpleSpanProcessor(exporter)])


@pytest.fixture()
def traced(tiny_model_dir: Path):
    exporter = InMemorySpanExporter()
    model = load_model(tiny_model_dir, CPU)
    runner = BreakableRunner(model.runner)
    engine = Engine(lambda: LoadedModel(model.directory, model.manifest, runner, model.tokenizer))
    with TestClient(create_app(Settings(), engine, _telemetry(exporter))) as client:
        wait_ready(client)
        yield client, exporter, runner


def _spans_of(exporter: InMemorySpanExporter, trace_id: str) -> list:
    return [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]


def _run(client: TestClient, message: dict, headers: dict | None = None) -> list[dict]:
    with client.websocket_connect("/v1/ws", headers=headers or {}) as ws:
        ws.send_text(json.dumps(message))
        return collect(ws, {message["id"]})[message["id"]]


def test_span_tree_of_one_request(traced) -> None:
    client, exporter, _ = traced
    n = 6
    msgs = _run(client, {"type": "generate", "id": "t1", "messages": [{"role": "user", "content": "Hello"}],
                         "params": {"temperature": 0.5, "top_k": 20, "seed": 3, "max_tokens": n, "ignore_eos": True}})
    trace_id = msgs[0]["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    spans = _spans_of(exporter, trace_id)
    root = [s for s in spans if s.parent is None]
    assert len(root) == 1
    root = root[0]
    model = Path(client.get("/v1/models").json()["data"][0]["id"]).name
    assert root.name == f"chat {model}"
    children = [s for s in spans if s.parent is not None]
    assert all(s.parent.span_id == root.context.span_id for s in children)
    names = [s.name for s in children]
    assert names.count("tokenize") == names.count("queue") == names.count("prefill") == 1
    # The prefill's forward pass yields the first token; each later token has its own forward.
    assert names.count("forward") == n - 1
    assert names.count("sample") == n and names.count("detokenize") == n
    steps = sorted(s.attributes["streamgen.step"] for s in children if s.name == "sample")
    assert steps == list(range(n))
    assert all(s.attributes["streamgen.batch_size"] == 1 for s in children if s.name in ("forward", "sample"))
    for child in children:
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time

    a = root.attributes
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.request.model"] == model
    assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.top_k"] == 20
    assert a["gen_ai.request.seed"] == 3 and a["gen_ai.request.max_tokens"] == n
    assert "gen_ai.request.top_p" not in a, "only parameters that were set"
    # The client chose "t1", which clients reuse across connections: the server's own id names the request, and
    # the client's is beside it.
    assert a["gen_ai.response.id"].startswith("req-") and a["streamgen.client_request_id"] == "t1"
    assert tuple(a["gen_ai.response.finish_reasons"]) == ("length",)
    assert a["gen_ai.usage.input_tokens"] == msgs[0]["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == n
    assert root.status.status_code == StatusCode.UNSET


def test_request_detail_gives_one_decode_span(tiny_model_dir: Path) -> None:
    exporter = InMemorySpanExporter()
    engine = Engine(lambda: load_model(tiny_model_dir, CPU))
    with TestClient(create_app(Settings(), engine, _telemetry(exporter, detail="request"))) as client:
        wait_ready(client)
        msgs = _run(client, {"type": "generate", "id": "s", "prompt": "Hi", "params": {"max_tokens": 8, "ignore_eos": True}})
    names = sorted(s.name for s in _spans_of(exporter, msgs[0]["trace_id"]) if s.parent is not None)
    assert names == ["decode", "prefill", "queue", "tokenize"]


def test_cancelled_and_failed_requests_carry_their_status(traced) -> None:
    client, exporter, runner = traced
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": "c", "prompt": "Hello",
                                 "params": {"max_tokens": 200, "ignore_eos": True}}))
        trace_id = ws.receive_json()["trace_id"]
        assert ws.receive_json()["type"] == "token"
        ws.send_text(json.dumps({"type": "cancel", "id": "c"}))
        collect(ws, {"c"})
    (root,) = [s for s in _spans_of(exporter, trace_id) if s.parent is None]
    assert tuple(root.attributes["gen_ai.response.finish_reasons"]) == ("cancelled",)
    assert root.status.status_code == StatusCode.UNSET

    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": "f", "prompt": "Hello",
                                 "params": {"max_tokens": 200, "ignore_eos": True}}))
        trace_id = ws.receive_json()["trace_id"]
        assert ws.receive_json()["type"] == "token"
        runner.broken = True
        assert collect(ws, {"f"})["f"][-1]["code"] == "internal"
    (root,) = [s for s in _spans_of(exporter, trace_id) if s.parent is None]
    assert root.status.status_code == StatusCode.ERROR
    assert root.attributes["error.type"] == "internal"


def test_rejected_request_span_has_error_type(traced) -> None:
    client, exporter, _ = traced
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": "r", "prompt": "Hi", "params": {"max_tokens": 10**5}}))
        assert ws.receive_json()["code"] == "context_length_exceeded"
    (root,) = [s for s in exporter.get_finished_spans() if s.parent is None and s.attributes.get("streamgen.client_request_id") == "r"]
    assert root.status.status_code == StatusCode.ERROR and root.attributes["error.type"] == "context_length_exceeded"


@pytest.mark.parametrize("where", ["handshake", "message"])
def test_traceparent_makes_the_request_a_child_of_the_callers_trace(traced, where: str) -> None:
    client, exporter, _ = traced
    msg = {"type": "generate", "id": "w3c", "prompt": "Hi", "params": {"max_tokens": 2}}
    headers = {}
    if where == "message":
        msg["traceparent"] = TRACEPARENT
    else:
        headers = {"traceparent": TRACEPARENT}
    msgs = _run(client, msg, headers)
    assert msgs[0]["trace_id"] == CALLER_TRACE
    (root,) = [s for s in _spans_of(exporter, CALLER_TRACE) if s.name.startswith("text_completion")]
    assert format(root.parent.span_id, "016x") == CALLER_SPAN and root.parent.is_remote


def test_metrics_count_what_happened(traced) -> None:
    client, _, _ = traced
    before = _scrape(client)
    finals = []
    for i, n in enumerate((3, 5, 7)):
        finals.append(_run(client, {"type": "generate", "id": f"m{i}", "prompt": "Hello",
                                    "params": {"max_tokens": n, "ignore_eos": True}})[-1])
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": "bad", "prompt": "x", "params": {"top_p": 7}}))
        ws.receive_json()
    after = _scrape(client)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, labels) - _value(before, name, labels)

    assert delta("gen_ai_server_time_to_first_token_seconds_count") == 3
    assert delta("gen_ai_server_time_per_output_token_seconds_count") == 3
    assert delta("gen_ai_server_request_duration_seconds_count") == 3
    assert delta("streamgen_tokens_output_total") == sum(f["usage"]["completion_tokens"] for f in finals) == 15
    assert delta("streamgen_tokens_input_total") == sum(f["usage"]["prompt_tokens"] for f in finals)
    assert delta("streamgen_requests_total", finish_reason="length") == 3
    assert delta("streamgen_requests_total", error_type="invalid_parameter") == 1
    # The conventions' bucket boundaries are used.
    assert 'gen_ai_server_time_to_first_token_seconds_bucket{' in after and 'le="0.04"' in after
    for gauge in ("streamgen_requests_active", "streamgen_requests_queued", "streamgen_connections_open"):
        assert re.search(rf"^{gauge}(\{{[^}}]*\}})? 0\.0$", after, re.M), gauge


def _scrape(client: TestClient) -> str:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def _value(text: str, name: str, labels: dict[str, str]) -> float:
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total
