"""`make gpu-check`: the CUDA tests and the GPU benchmark in one run, with a summary. Under 5 minutes on one GPU.

    .venv/bin/python tests/gpu_check.py [--budget SECONDS]

1. `pytest -m cuda`: CUDA greedy equal to the CPU's fp16 greedy on the tiny model; batch invariance with the
   churn schedule; CUDA graphs equal to launched kernels; a real `streamgen serve --device cuda` answering
   over the WebSocket (tests/test_cuda.py).
2. `streamgen bench gpu`: decode tok/s at batch 1, 16 and 64 with CUDA graphs off and on, against
   transformers fp16 eager and static+compile (streamgen/bench/gpu.py), JSON in artifacts/gpu.json.

On a machine without a usable CUDA it says why and exits 1 without running anything.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=290, help="seconds for both parts together (default 290)")
    args = parser.parse_args()
    from streamgen.engine.device import cuda_problem

    if (problem := cuda_problem()) is not None:
        print(f"gpu-check: no usable CUDA here ({problem}); run it on a machine with an NVIDIA GPU and "
              "onnxruntime-gpu (docs/gpu.md)", file=sys.stderr)
        return 1
    start = time.monotonic()
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    tests = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p", "no:cacheprovider",
                            "tests/test_cuda.py"], cwd=ROOT, timeout=args.budget)
    left = max(30, int(args.budget - (time.monotonic() - start)))
    bench = subprocess.run([sys.executable, "-m", "streamgen", "bench", "gpu", "--rounds", "2", "--tokens", "64",
                            "--json", str(artifacts / "gpu.json")], cwd=ROOT, timeout=left)
    print(f"\ngpu-check summary ({time.monotonic() - start:.0f}s):")
    print(f"  CUDA tests: {'passed' if tests.returncode == 0 else f'FAILED (exit {tests.returncode})'}")
    if bench.returncode == 0:
        data = json.loads((artifacts / "gpu.json").read_text())
        print(f"  bench gpu on {data['gpu']} ({data['build']}):")
        for row in data["rows"]:
            print(f"    {row['contender']:32s} batch {row['batch']:>3}: {row['median']:8.1f} tok/s")
    else:
        print(f"  bench gpu: FAILED (exit {bench.returncode})")
    return 0 if tests.returncode == 0 and bench.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
