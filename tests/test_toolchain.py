"""The serving install carries no export tools, and the export toolchain is made on the first pull that needs
it, reused, and removed with `pull --clean-toolchain`.

The end-to-end test really installs both: a serving environment from this checkout (`pip install .`) and,
through that environment's own `streamgen pull`, the toolchain in a fresh cache directory; then the tiny model
is pulled through it. A few minutes, mostly pip (from its cache after the first run).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from streamgen.models import toolchain

from install_sizes import NOT_SERVING, ROOT, installed, serving_install


def test_the_toolchain_installs_the_export_extra_of_pyproject() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["export"]
    assert toolchain.requirements() == sorted(extra), "one list: pyproject's export extra"
    assert {r.split("=")[0].split(">")[0] for r in extra} >= {"torch", "transformers", "optimum", "onnx", "gguf"}


def test_pytorch_comes_from_the_setting_else_the_cpu_index_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(toolchain.INDEX_ENV, raising=False)
    monkeypatch.setattr(toolchain, "has_gpu", lambda: False)
    assert toolchain.index_url() == toolchain.CPU_INDEX == "https://download.pytorch.org/whl/cpu"
    monkeypatch.setattr(toolchain, "has_gpu", lambda: True)
    assert toolchain.index_url() is None, "with a GPU, PyPI's (CUDA) build"
    monkeypatch.setenv(toolchain.INDEX_ENV, "https://mirror.example/torch-cpu")
    assert toolchain.index_url() == "https://mirror.example/torch-cpu"
    assert toolchain.index_url("https://flag.example/") == "https://flag.example/", "the flag wins"
    assert toolchain.index_url("") is None, "empty: PyPI"


def test_this_environment_has_the_tools_so_pulls_run_here(tmp_path: Path) -> None:
    found = toolchain.find(tmp_path)
    assert found == toolchain.Toolchain(Path(sys.executable), here=True)
    assert not (tmp_path / "toolchain").exists(), "nothing made when the tools are here"


def test_serving_install_pulls_through_a_toolchain_it_makes_reuses_and_cleans(tiny_hf_dir: Path,
                                                                              tmp_path: Path) -> None:
    python = serving_install(tmp_path / "serve")
    leaked = set(NOT_SERVING) & set(installed(python))
    assert not leaked, f"the serving install holds export tools: {leaked}"
    streamgen = [str(python), "-m", "streamgen"]
    home = tmp_path / "home"

    def pull(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([*streamgen, "pull", str(tiny_hf_dir), "--home", str(home), *flags],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)

    first = pull()
    assert first.returncode == 0, first.stderr[-3000:]
    assert "creating the export toolchain" in first.stderr and "export toolchain ready" in first.stderr
    assert "Collecting torch" in first.stderr or "torch" in first.stderr, "pip's progress is shown"
    built = Path(first.stdout.strip().splitlines()[-1])
    assert (built / "manifest.json").is_file() and built.parent.parent == home / "models"
    tools = home / "toolchain"
    assert (tools / "bin" / "python").exists() and "torch" in installed(tools / "bin" / "python")

    served = subprocess.run([*streamgen, "generate", "Hello", "--model", str(tiny_hf_dir), "--home", str(home),
                             "--no-pull", "--max-tokens", "4", "--temperature", "0"],
                            capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-2000:]

    again = pull("--kv-cache", "int8")  # a derived build: the toolchain again, not made again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "creating the export toolchain" not in again.stderr
    assert Path(again.stdout.strip().splitlines()[-1]).name.endswith("kvint8")

    cleaned = subprocess.run([*streamgen, "pull", "--clean-toolchain", "--home", str(home)], capture_output=True,
                             text=True, timeout=300)
    assert cleaned.returncode == 0 and "removed the export toolchain" in cleaned.stderr
    assert not tools.exists() and built.exists(), "the models stay"
    gone = subprocess.run([*streamgen, "pull", "--clean-toolchain", "--home", str(home)], capture_output=True,
                          text=True, timeout=300)
    assert gone.returncode == 0 and "there is no export toolchain" in gone.stderr
