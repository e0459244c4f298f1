"""Imports point one way (README, "How it works"): the contracts in pyproject.toml, checked by import-linter.

- cli and bench sit on top, then the server, then telemetry, models and the settings, then the engine, then
  the model files; nothing imports upwards, and no package's modules import each other in a cycle;
- the serving path (engine, server, telemetry, settings) never imports the export toolchain;
- only the runners touch ONNX Runtime.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_import_contract_is_kept() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    result = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout
