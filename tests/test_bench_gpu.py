"""`streamgen bench gpu`'s measuring code, run on the CPU with the tiny model (the benchmark itself needs a
GPU: `make gpu-check`). The contenders really decode: streamgen's SlotRunner on the fp16 build and
transformers' generate on the same tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamgen.bench.gpu import StreamgenDecode, TransformersDecode, measure
from streamgen.engine.device import Device, cuda_problem
from streamgen.model_files import Build

from helpers import quiet


def test_without_cuda_the_benchmark_says_what_it_needs(capsys) -> None:
    if cuda_problem() is None:
        pytest.skip("this machine has CUDA")
    from streamgen.cli import main

    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "bench gpu needs a usable CUDA GPU" in err and "make gpu-check" in err


def test_every_contender_is_measured_at_every_width_in_every_round(tiny_hf_dir: Path, tiny_cache,
                                                                  tiny_model_dir: Path) -> None:
    from streamgen.models.pull import pull

    fp16 = pull(str(tiny_hf_dir), Build("none", "fp16"), tiny_cache, quiet())
    logged: list[str] = []
    contenders = [StreamgenDecode("streamgen", fp16, Device("cpu"), max_batch=4, context=64),
                  TransformersDecode("transformers eager", tiny_hf_dir, "cpu", "float32", compiled=False)]
    prompt = [5, 6, 7, 8, 9]
    rows = measure(contenders, prompt, batches=[1, 4], tokens=6, rounds=2, log=logged.append)
    assert [(r.contender, r.batch) for r in rows] == [("streamgen", 1), ("streamgen", 4),
                                                      ("transformers eager", 1), ("transformers eager", 4)]
    assert all(len(r.tok_s) == 2 and min(r.tok_s) > 0 for r in rows)
    assert len(logged) == 2 * 2 * 2
    assert logged[0].startswith("round 1/2 batch 1: streamgen") and logged[4].startswith(
        "round 2/2 batch 1: transformers eager"), "the second round runs the contenders in the other order"
    assert contenders[0].runner.table.free_count == 4, "every slot given back after each run"
