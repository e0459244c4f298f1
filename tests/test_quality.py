"""The quality benchmark's code on the tiny model (the real figures are in docs/benchmarks.md)."""

from __future__ import annotations

import math

from streamgen.bench.quality import load_texts, run_quality
from streamgen.models.pull import pull

from conftest import quiet


def test_quality_benchmark_runs_on_the_tiny_model(tiny_hf_dir, tiny_model_dir, tiny_cache) -> None:
    dirs = {"none": tiny_model_dir}
    for q in ("int8", "int4"):
        dirs[q] = pull(str(tiny_hf_dir), q, tiny_cache, quiet())
    texts = load_texts()[:3]
    rows = {r.quantization: r for r in run_quality(dirs, texts=texts)}
    ref = rows["none"]
    assert ref.top1_agreement == 1.0 and ref.mean_kl == 0.0 and ref.positions > 100
    assert math.isfinite(ref.perplexity) and ref.perplexity > 1
    for q in ("int8", "int4"):
        r = rows[q]
        assert r.positions == ref.positions
        assert 0.0 < r.top1_agreement <= 1.0 and r.mean_kl >= 0.0 and math.isfinite(r.perplexity)
    # 8-bit weights stay closer to fp32 than 4-bit ones.
    assert rows["int8"].mean_kl < rows["int4"].mean_kl
