"""What answers cost, as the server reports it: `done.usage.cost_usd` on the WebSocket and `usage.cost_usd` in
the OpenAI API with --price-per-hour (and neither without), /v1/stats' last minute, and the `streamgen.cost`
counter at /metrics. Starlette's test client on the tiny model. (How step time is split among requests is
unit-tested in tests/test_scheduler.py.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from streamgen.config import Settings
from streamgen.engine.engine import Engine
from streamgen.engine.loader import load_model
from streamgen.server.app import create_app

from conftest import CPU
from helpers import check_stream, collect, wait_ready

PRICE = 3.6  # USD an hour: a cent a second, so cost_usd = compute_s / 100
PARAMS = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}


def _client(model_dir: Path, price: float | None) -> TestClient:
    engine = Engine(lambda: load_model(model_dir, CPU))
    return TestClient(create_app(Settings(price_per_hour=price), engine))


@pytest.fixture(scope="module")
def priced(tiny_model_dir: Path) -> Iterator[TestClient]:
    with _client(tiny_model_dir, PRICE) as client:
        wait_ready(client)
        yield client


@pytest.fixture(scope="module")
def unpriced(tiny_model_dir: Path) -> Iterator[TestClient]:
    with _client(tiny_model_dir, None) as client:
        wait_ready(client)
        yield client


def _ws_done(client: TestClient, rid: str, **params) -> dict:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(json.dumps({"type": "generate", "id": rid, "prompt": "The quick brown fox",
                                 "params": {**PARAMS, **params}}))
        return check_stream(collect(ws, {rid})[rid])


def _cost_total(client: TestClient) -> dict[str, float]:
    """streamgen.cost by finish_reason (its series for every operation added), from the Prometheus text."""
    totals: dict[str, float] = {}
    for m in re.finditer(r'^streamgen_cost_USD_total\{[^}]*finish_reason="(\w+)"[^}]*\} (\S+)$',
                         client.get("/metrics").text, flags=re.M):
        totals[m.group(1)] = totals.get(m.group(1), 0.0) + float(m.group(2))
    return totals


def test_each_answer_carries_its_cost_with_a_price(priced: TestClient) -> None:
    short, long = _ws_done(priced, "short", max_tokens=4), _ws_done(priced, "long", max_tokens=48)
    for done in (short, long):
        assert 0 < done["usage"]["cost_usd"] < 1e-3, done["usage"]
    assert long["usage"]["cost_usd"] > short["usage"]["cost_usd"], "more tokens run, a larger share of the machine"
    body = priced.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], **PARAMS,
                                                     "n": 2}).json()
    assert body["usage"]["cost_usd"] > 0 and body["usage"]["completion_tokens"] == 32


def test_no_price_no_cost(unpriced: TestClient) -> None:
    done = _ws_done(unpriced, "free")
    assert "cost_usd" not in done["usage"] and done["usage"]["completion_tokens"] == 16
    body = unpriced.post("/v1/completions", json={"prompt": "Hi", **PARAMS}).json()
    assert "cost_usd" not in body["usage"]
    assert _cost_total(unpriced) == {}, "nothing counted without a price"
    minute = unpriced.get("/v1/stats").json()["last_minute"]
    assert "cost_per_million_output_tokens_usd" not in minute and minute["output_tokens"] >= 32


def test_stats_last_minute_says_how_busy_the_engine_was_and_what_a_token_cost(priced: TestClient) -> None:
    done = _ws_done(priced, "stats", max_tokens=32)
    minute = priced.get("/v1/stats").json()["last_minute"]
    assert set(minute) == {"seconds", "busy_s", "utilisation", "output_tokens", "cost_per_million_output_tokens_usd"}
    assert minute["output_tokens"] >= 32 and 0 < minute["busy_s"] and 0 < minute["utilisation"] <= 1
    # seconds is rounded to 0.1 s, busy_s to 1 ms: utilisation is busy over the window's real length
    assert minute["busy_s"] / (minute["seconds"] + 0.05) - 0.01 <= minute["utilisation"]
    assert minute["utilisation"] <= minute["busy_s"] / max(minute["seconds"] - 0.05, 0.001) + 0.01
    per_million = minute["cost_per_million_output_tokens_usd"]
    assert per_million == pytest.approx(minute["busy_s"] * PRICE / 3600 / minute["output_tokens"] * 1e6, rel=0.05)
    # This request's own cost per token is its share of the busy time, never more than all of it.
    assert done["usage"]["cost_usd"] / 32 * 1e6 <= per_million * minute["output_tokens"] / 32 + 1e-9


def test_the_cost_counter_adds_up_the_answers(priced: TestClient) -> None:
    before = _cost_total(priced)
    costs = [_ws_done(priced, f"c{i}", max_tokens=8)["usage"]["cost_usd"] for i in range(3)]
    after = _cost_total(priced)
    assert after["length"] - before.get("length", 0.0) == pytest.approx(sum(costs), rel=1e-3, abs=1e-8)
