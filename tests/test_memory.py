"""The footprint the server reports: /v1/stats' memory and the ready line's, for each KV number format.

Starlette's test client on the tiny model's builds. The KV cache is what grows with users, so its size is
checked against the arithmetic: layers x (K, V) x KV heads x head size x bytes per value x slots x context.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from streamgen.config import Settings
from streamgen.engine.engine import Engine
from streamgen.engine.loader import load_model
from streamgen.model_files import Manifest
from streamgen.server.app import create_app

from conftest import CPU
from helpers import check_stream, collect, wait_ready

BYTES_PER_VALUE = {"fp32": 4, "fp16": 2, "int8 KV": 1}


@pytest.mark.parametrize("tiny_build_dir", ["fp32", "fp16", "int8 KV"], indirect=True)
def test_stats_report_weights_kv_cache_and_resident_memory(tiny_build_dir: Path, tiny_hf_dir: Path,
                                                           request: pytest.FixtureRequest) -> None:
    fmt = request.node.callspec.params["tiny_build_dir"]
    hf = json.loads((tiny_hf_dir / "config.json").read_text())
    head = hf["hidden_size"] // hf["num_attention_heads"]
    engine = Engine(lambda: load_model(tiny_build_dir, CPU))
    with TestClient(create_app(Settings(), engine)) as client:
        wait_ready(client)
        model = engine.model
        before = client.get("/v1/stats").json()["memory"]
        with client.websocket_connect("/v1/ws") as ws:
            ws.send_text(json.dumps({"type": "generate", "id": "m", "prompt": "The quick brown fox",
                                     "params": {"temperature": 0, "max_tokens": 8, "ignore_eos": True}}))
            check_stream(collect(ws, {"m"})["m"])
        after = client.get("/v1/stats").json()["memory"]

    assert Manifest.read(tiny_build_dir).kv_cache == ("int8" if fmt == "int8 KV" else "auto")
    files = sum(p.stat().st_size for p in tiny_build_dir.glob("model.onnx*"))
    assert before["weights_mib"] == after["weights_mib"] == round(files / 2**20, 1)
    slots, context = model.runner.max_slots, model.context_length
    kv = hf["num_hidden_layers"] * 2 * hf["num_key_value_heads"] * head * BYTES_PER_VALUE[fmt] * slots * context
    assert after["kv_cache_mib"] == round(kv / 2**20, 1), (fmt, slots, context)
    for memory in (before, after):
        assert 0 < memory["rss_mib"] <= memory["peak_rss_mib"]
    assert after["peak_rss_mib"] >= before["peak_rss_mib"], "a peak never falls"
