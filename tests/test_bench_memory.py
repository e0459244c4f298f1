"""`streamgen bench memory` end to end on the tiny model, against the stand-in llama-server of
tests/test_bench_peers.py (a Python process, so its memory is real if small)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from streamgen.bench.memory import process_mib

from test_bench_peers import fake_llama  # noqa: F401 - the fixture


def test_process_memory_of_this_process() -> None:
    import numpy as np

    before = process_mib(__import__("os").getpid(), "VmRSS")
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page touched
    after = process_mib(__import__("os").getpid(), "VmRSS")
    assert after - before > 50, (before, after)
    assert process_mib(__import__("os").getpid(), "VmHWM") >= after
    del block


def test_memory_bench_runs_each_build_and_the_peer(tiny_hf_dir, tiny_model_dir, tiny_cache, tmp_path, capsys,
                                                   fake_llama) -> None:  # noqa: F811
    from streamgen.cli import main

    binary, record = fake_llama
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "memory.json"
    assert main(["bench", "memory", "--model", str(tiny_hf_dir), "--home", str(tiny_cache.home),
                 "--builds", "none,none-kvint8", "--requests", "4", "--prompt-tokens", "20", "--max-tokens", "12",
                 "--max-batch", "4", "--max-context", "128", "--llama-server", str(binary), "--gguf", str(gguf),
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| streamgen none-kvint8 |" in printed and "| llama-server |" in printed
    data = json.loads(out.read_text())
    rows = {r["server"]: r for r in data["rows"]}
    assert list(rows) == ["streamgen none", "streamgen none-kvint8", "llama-server"]
    for row in rows.values():
        assert row["requests"] == 4 and row["failed"] == 0
        assert row["output_tokens"] == 4 * 12, "ignore_eos: each request ran to its max_tokens"
        assert 0 < row["idle_mib"] and 0 < row["after_mib"] <= row["peak_mib"]
    fp32, int8 = rows["streamgen none"]["breakdown"], rows["streamgen none-kvint8"]["breakdown"]
    assert int8["kv_cache_mib"] == pytest.approx(fp32["kv_cache_mib"] / 4, abs=0.1), "int8 KV: a byte a value"
    assert fp32["weights_mib"] == int8["weights_mib"], "the same fp32 weights"
    assert rows["llama-server"]["breakdown"]["command"].startswith(f"-m {gguf} -c 32768 -np 16")
    bodies = [json.loads(line)["body"] for line in Path(record).read_text().splitlines()[1:]]
    assert len(bodies) == 5 and all(b["cache_prompt"] is False and b["ignore_eos"] for b in bodies)
    assert len({b["messages"][0]["content"] for b in bodies[1:]}) == 4, "distinct prompts: nothing shared"
