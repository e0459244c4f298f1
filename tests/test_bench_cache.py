"""`streamgen bench cache --costs-only` on the tiny model (the whole benchmark runs two real servers on the
default model; its workloads are driven by the same clients the other bench tests cover)."""

from __future__ import annotations

import json


def test_cache_bench_costs_only_times_prompt_passes_and_starts_no_server(tiny_hf_dir, tiny_model_dir, tiny_cache,
                                                                         tmp_path, capsys) -> None:
    """`bench cache --costs-only`: the step costs the scheduler weighs, with the fixed cost of a prompt pass."""
    from streamgen.cli import main

    out = tmp_path / "costs.json"
    assert main(["bench", "cache", "--costs-only", "--model", str(tiny_hf_dir), "--home", str(tiny_cache.home),
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| prompt pass of (tokens) | 4 | 16 | 64 |" in printed and "cache on" not in printed
    costs = json.loads(out.read_text())["costs"]
    assert list(costs) == ["decode_ms", "row_ms", "prefill_ms_per_token", "copy_ms_per_token", "prefill_pass_ms",
                           "prefill_pass_fixed_ms"], "costs only: no server figures"
    passes = {int(n): ms for n, ms in costs["prefill_pass_ms"].items()}
    assert list(passes) == [4, 16, 64]
    assert passes[64] > passes[4], "a longer prompt pass takes longer"
