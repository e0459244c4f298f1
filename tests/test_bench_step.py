"""`streamgen bench step` on the tiny model: its figures are consistent with one another."""

from __future__ import annotations

import json

import pytest


def test_bench_step_profiles_the_decode_runs_and_their_kernels(tiny_hf_dir, tiny_model_dir, tiny_cache,
                                                                tmp_path) -> None:
    from streamgen.cli import main

    out = tmp_path / "step.json"
    assert main(["bench", "step", "--model", str(tiny_hf_dir), "--home", str(tiny_cache.home), "--quantize", "none",
                 "--tokens", "12", "--batch", "2", "--rounds", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    p = report["profile"]
    assert report["llama_server"] is None and report["llama_server_token_ms"] is None
    assert report["streamgen_step_ms"] > 0
    # Kernels run inside the session's run, which runs inside the step.
    assert 0 < p["kernel_ms"] <= p["run_ms"] <= p["wall_ms"]
    # Only decode runs are counted (the two prefills are not): every step launches the same nodes, and a
    # 2-layer Llama's step has its MatMuls and a GroupQueryAttention node per layer.
    assert p["nodes"] >= 10 and {"MatMul", "GroupQueryAttention"} <= set(p["ops"])
    assert sum(p["ops"].values()) == pytest.approx(1.0, abs=0.01)
