"""The serving install carries no export tools, and the export toolchain is made on the first pull that needs
it, reused, and removed with `pull --clean-toolchain`.

The end-to-end test really installs both: a serving environment from this checkout (`pip install .`) and,
through that environment's own `streamgen pull`, the toolchain in a fresh cache directory; then the tiny model
is pulled through it. A few minutes, mostly pip (from its cache after the first run).
"""

from __future__ import annotations

import http.server
import io
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamgen import DISTRIBUTION
from streamgen.models import toolchain

from install_sizes import NOT_SERVING, ROOT, installed, serving_install


def test_the_toolchain_installs_the_export_extra_of_pyproject() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["export"]
    assert toolchain.requirements() == sorted(extra), "one list: pyproject's export extra"
    assert {r.split("=")[0].split(">")[0] for r in extra} >= {"torch", "transformers", "optimum", "onnx", "gguf"}


def test_the_distribution_is_named_once_and_is_not_pypis_streamgen() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION != "streamgen", "PyPI's streamgen is an unrelated project"
    assert project["scripts"] == {"streamgen": "streamgen.cli:main"}, "the command keeps its name"


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


def _closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def local_index() -> Iterator[str]:
    """A package index that answers: a tiny HTTP server on loopback."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    server.RequestHandlerClass.log_message = lambda *args: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_an_index_that_does_not_answer_is_left_out_in_one_line(monkeypatch: pytest.MonkeyPatch, no_proxy) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/whl/cpu"
    monkeypatch.setenv(toolchain.INDEX_ENV, dead)
    said = io.StringIO()
    start = time.monotonic()
    assert toolchain.usable_index(out=said) is None, "pip is given no extra index: PyPI alone"
    assert time.monotonic() - start < 3, "found out in a second or two, not after pip's retries"
    lines = said.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert dead in lines[0] and "does not answer" in lines[0]
    assert "CUDA build" in lines[0], "says what PyPI's torch is"
    assert f"{toolchain.INDEX_ENV}=URL" in lines[0] and f"{toolchain.INDEX_ENV}= (empty)" in lines[0]
    assert toolchain.usable_index(dead, out=io.StringIO()) is None, "the flag is checked the same way"


def test_an_index_that_answers_is_kept(monkeypatch: pytest.MonkeyPatch, local_index: str, no_proxy) -> None:
    monkeypatch.setenv(toolchain.INDEX_ENV, local_index)
    said = io.StringIO()
    assert toolchain.usable_index(out=said) == local_index and said.getvalue() == ""
    assert toolchain.answers(local_index)
    assert toolchain.answers(local_index + "missing/"), "a 404 is an answer: the index is there"
    monkeypatch.setenv(toolchain.INDEX_ENV, "")
    assert toolchain.usable_index(out=said) is None and said.getvalue() == "", "empty: PyPI, unchecked"


def test_an_index_that_never_answers_costs_the_timeout_only(no_proxy) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        start = time.monotonic()
        why = toolchain.unanswered(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.5)
        assert why is not None and time.monotonic() - start < 1.5, why


def test_pips_output_is_condensed_and_its_errors_pass() -> None:
    retry = ("WARNING: Retrying (Retry(total={n}, connect=None, read=None, redirect=None, status=None)) after "
             "connection broken by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at "
             "0x7f{n}>: Failed to establish a new connection: [Errno -2] Name or service not known')': "
             "/whl/cpu/{pkg}/")
    lines = ["Looking in indexes: https://pypi.org/simple, https://download.pytorch.org/whl/cpu"]
    for pkg in ("torch", "numpy", "sympy", "filelock") * 12:
        lines += [f"Collecting {pkg}", *(retry.format(n=n, pkg=pkg) for n in range(4, -1, -1)),
                  f"  Downloading {pkg}-1.0-py3-none-any.whl (1.2 MB)"]
    lines += ["  Downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (190.3 MB)",
              "Requirement already satisfied: pip in ./venv/lib/python3.11/site-packages (23.2.1)",
              "Installing collected packages: torch, numpy, sympy, filelock",
              "Successfully installed filelock-1 numpy-1 sympy-1 torch-2.13.0",
              "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
              "  more of the error"]
    out = io.StringIO()
    shown = toolchain.PipOutput(out, tty=False)
    for line in lines:
        shown.feed(line + "\n")
    shown.close(1)
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("WARNING: Retrying") and sum("Retrying" in p for p in printed) == 1
    assert "  downloading torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl (190 MB)" in printed
    assert "  installing 4 packages ..." in printed
    assert printed[-3:] == ["ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device",
                            "  more of the error", "  (239 repeated pip warnings not shown)"]
    assert len(printed) == 6, printed
    assert shown.summary() == "4 packages installed, 49 downloaded (248 MB), 1 already there"


def test_pip_install_as_the_makefile_runs_it_fails_in_a_few_lines() -> None:
    done = subprocess.run([sys.executable, "-m", "streamgen.models.toolchain", "pip-install", "a package that is not "
                           "there", "--no-index", "--find-links", "/nonexistent", "streamgen-no-such-package"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode != 0
    lines = done.stdout.splitlines()
    assert lines[0] == "installing a package that is not there ..."
    assert any(line.startswith("ERROR: No matching distribution found for streamgen-no-such-package")
               for line in lines), lines
    assert lines[-1].startswith("installing a package that is not there: pip failed after ")
    assert len(lines) < 10, lines


@pytest.mark.tiny  # it needs the export tools in this environment, which the unit tier hides
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
    assert "packages installed" in first.stderr, "pip's progress is shown, condensed"
    assert "Retrying" not in first.stderr and "Collecting" not in first.stderr
    built = Path(first.stdout.strip().splitlines()[-1])
    assert str(built) not in first.stderr, "the model's directory is printed once, on stdout"
    assert "[1/2] Exporting to ONNX" in first.stderr and "done in" in first.stderr, "the child's stages, drawn"
    assert "streamgen-stage" not in first.stderr
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
