"""Access control and limits through the app (tiny model, Starlette's test client)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from streamgen.config import Settings
from streamgen.engine.config import EngineConfig
from streamgen.engine.engine import Engine
from streamgen.engine.loader import load_model
from streamgen.server.app import create_app
from streamgen.server.security import RateLimiter

from conftest import CPU
from helpers import collect, generate_frame, wait_ready

KEY = "k3y-for-tests_0123456789"
SECURE = Settings(api_key=KEY, allowed_origins="https://chat.example.com")


@pytest.fixture()
def make_client(tiny_model_dir) -> Iterator:
    clients = []

    def make(settings: Settings, limits: EngineConfig = EngineConfig()) -> TestClient:
        client = TestClient(create_app(settings, Engine(lambda: load_model(tiny_model_dir, CPU), limits)))
        client.__enter__()
        clients.append(client)
        wait_ready(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _denied(client: TestClient, **kwargs) -> tuple[int, dict]:
    with pytest.raises(WebSocketDenialResponse) as denied:
        with client.websocket_connect("/v1/ws", **kwargs):
            pass
    return denied.value.status_code, denied.value.json()["error"]


def test_http_routes_need_the_key_except_health_and_the_page(make_client) -> None:
    c = make_client(SECURE)
    for path in ("/v1/models", "/v1/stats", "/metrics"):
        assert c.get(path).status_code == 401
        assert c.get(path, headers={"Authorization": "Bearer wrong-key-000000000"}).status_code == 401
        assert c.get(path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert c.get("/v1/models").json()["error"]["code"] == "unauthorized"
    for path in ("/health/live", "/health/ready", "/", "/static/app.js"):
        assert c.get(path).status_code == 200


def test_websocket_refuses_missing_and_wrong_keys(make_client) -> None:
    c = make_client(SECURE)
    status, error = _denied(c)
    assert status == 401 and error["code"] == "unauthorized" and "API key is required" in error["message"]
    status, error = _denied(c, subprotocols=["streamgen.v1", "bearer.not-the-key-000000"])
    assert status == 401 and "not valid" in error["message"]
    status, _ = _denied(c, headers={"Authorization": "Bearer not-the-key-000000"})
    assert status == 401


@pytest.mark.parametrize("how", ["subprotocol", "header"])
def test_websocket_accepts_the_key_by_subprotocol_or_header(make_client, how: str) -> None:
    c = make_client(SECURE)
    kwargs = ({"subprotocols": ["streamgen.v1", f"bearer.{KEY}"]} if how == "subprotocol"
              else {"headers": {"Authorization": f"Bearer {KEY}"}})
    with c.websocket_connect("/v1/ws", **kwargs) as ws:
        if how == "subprotocol":
            assert ws.accepted_subprotocol == "streamgen.v1", "the key is never echoed"
        ws.send_text(generate_frame("ok", max_tokens=3))
        assert collect(ws, {"ok"})["ok"][-1]["type"] == "done"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("https://evil.example.net", False),
        ("http://testserver.evil.net", False),
        ("null", False),
        ("http://testserver", True),  # same origin as the Host the test client sends
        ("http://localhost:5173", True),
        ("http://127.0.0.1:8080", True),
        ("https://chat.example.com", True),  # listed
    ],
)
def test_origin_allowlist(make_client, origin: str, allowed: bool) -> None:
    c = make_client(SECURE)
    kwargs = {"headers": {"Origin": origin}, "subprotocols": ["streamgen.v1", f"bearer.{KEY}"]}
    if allowed:
        with c.websocket_connect("/v1/ws", **kwargs) as ws:
            ws.send_text(json.dumps({"type": "ping"}))
            assert ws.receive_json() == {"type": "pong"}
    else:
        status, error = _denied(c, **kwargs)
        assert status == 403 and error["code"] == "origin_not_allowed"


def test_prompt_and_output_token_limits(tiny_model_dir) -> None:
    limits = EngineConfig(max_prompt_tokens=8, max_new_tokens=16)
    with TestClient(create_app(Settings(), Engine(lambda: load_model(tiny_model_dir, CPU), limits))) as c:
        wait_ready(c)
        with c.websocket_connect("/v1/ws") as ws:
            ws.send_text(generate_frame("long", "word " * 20))
            err = ws.receive_json()
            assert err["code"] == "prompt_too_long" and err["param"] == "prompt" and "at most 8" in err["message"]
            ws.send_text(generate_frame("many", max_tokens=17))
            err = ws.receive_json()
            assert err["code"] == "invalid_parameter" and err["param"] == "max_tokens" and "at most 16" in err["message"]
            ws.send_text(generate_frame("fine", ignore_eos=True))
            done = collect(ws, {"fine"})["fine"][-1]
            assert done["usage"]["completion_tokens"] == 16, "the default max_tokens respects the server's cap"


def test_connection_limit(make_client) -> None:
    c = make_client(replace(Settings(), max_connections=2))
    with c.websocket_connect("/v1/ws"), c.websocket_connect("/v1/ws"):
        status, error = _denied(c)
        assert status == 503 and error["code"] == "too_many_connections"
    with c.websocket_connect("/v1/ws") as ws:  # a slot is free again
        ws.send_text(json.dumps({"type": "ping"}))
        assert ws.receive_json() == {"type": "pong"}


def test_rate_limit_per_client(make_client) -> None:
    c = make_client(replace(Settings(), rate_limit=3))
    with c.websocket_connect("/v1/ws") as ws:
        for i in range(3):
            ws.send_text(generate_frame(f"r{i}", max_tokens=2))
            assert collect(ws, {f"r{i}"})[f"r{i}"][-1]["type"] == "done"
        ws.send_text(generate_frame("r3", max_tokens=2))
        err = ws.receive_json()
        assert err["code"] == "rate_limited" and err["retry_after_ms"] > 1000


def test_rate_limiter_refills() -> None:
    limiter = RateLimiter(per_minute=60)
    assert all(limiter.take("a", now=0.0) == 0 for _ in range(60))
    assert limiter.take("a", now=0.0) == 1000
    assert limiter.take("b", now=0.0) == 0, "clients are counted apart"
    assert limiter.take("a", now=1.0) == 0, "one token back per second"


def test_idle_connection_is_closed(make_client) -> None:
    c = make_client(replace(Settings(), idle_timeout=1))
    with c.websocket_connect("/v1/ws") as ws:
        start = time.monotonic()
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1000 and "idle" in closed.value.reason
        assert time.monotonic() - start >= 0.9, "not closed before the idle timeout"


def test_each_key_reuses_only_its_own_cache(make_client) -> None:
    """A prefix-cache hit is a timing side channel: with keys, a request only hits KV its own key left."""
    other = "another-k3y-for-tests_987654"
    c = make_client(replace(SECURE, api_key=f"{KEY},{other}"))
    prompt = "Paris is the capital of France. Berlin is the capital of Germany. The quick brown fox jumps. " * 3

    def cached(key: str, rid: str) -> int:
        with c.websocket_connect("/v1/ws", headers={"Authorization": f"Bearer {key}"}) as ws:
            ws.send_text(generate_frame(rid, prompt, temperature=0, max_tokens=2))
            return collect(ws, {rid})[rid][-1]["usage"]["cached_tokens"]

    assert cached(KEY, "a1") == 0
    assert cached(other, "b1") == 0, "the other key does not see the first key's prompt"
    assert cached(KEY, "a2") > 30 and cached(other, "b2") > 30, "each key hits what it left itself"
