"""The command line as a new user meets it: every failure is one `streamgen: error:` line that says what to do
(no traceback unless --log-level debug), --version, help without artefacts. Real processes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from streamgen import __version__


def _run(*args: str, env: dict[str, str] | None = None, home: Path | None = None,
         timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGEN_")}
    if home is not None:
        base["STREAMGEN_HOME"] = str(home)
    return subprocess.run([sys.executable, "-m", "streamgen", *args], capture_output=True, text=True,
                          timeout=timeout, env={**base, **(env or {})})


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The error line, after checking it is the only thing that looks like an error."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("streamgen: error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, "the traceback is only for --log-level debug"
    return errors[0]


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.startswith(f"streamgen {__version__} (onnxruntime")


def test_help_has_no_default_artefacts() -> None:
    text = _run("serve", "--help").stdout
    assert "--prefix-cache" in text and "STREAMGEN_MAX_BATCH" in text
    for artefact in ("default None", "default ]", "default )"):
        assert artefact not in text


def test_a_busy_port_is_refused_before_any_model_work(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("serve", "--port", str(port), home=tmp_path)  # an empty cache: it would have to pull
    line = _one_error_line(result)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    assert not (tmp_path / "models").exists(), "nothing was pulled"


def test_a_bad_environment_value_names_the_variable(tmp_path: Path) -> None:
    result = _run("serve", env={"STREAMGEN_MAX_BATCH": "lots"}, home=tmp_path)
    assert result.returncode == 2
    assert _one_error_line(result).endswith("STREAMGEN_MAX_BATCH must be an integer, got 'lots'")


def test_limits_must_fit_the_context(tmp_path: Path) -> None:
    result = _run("serve", "--max-prompt-tokens", "4096", home=tmp_path)
    assert result.returncode == 2
    assert "--max-prompt-tokens must be below the context (2048), got 4096" in _one_error_line(result)


def test_a_missing_model_says_how_to_pull_it(tmp_path: Path) -> None:
    result = _run("serve", "--no-pull", "--port", "0", home=tmp_path)
    line = _one_error_line(result)
    assert result.returncode == 2 and "is not in the cache" in line and "streamgen pull SmolLM2-135M-Instruct" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = _run("serve", "--no-pull", "--port", "0", "--log-level", "debug", home=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr and "streamgen: error: " in result.stderr


@pytest.mark.tiny
def test_a_hub_model_that_cannot_be_downloaded_is_one_line(tmp_path: Path) -> None:
    result = _run("pull", "streamgen-tests/no-such-model", "--quantize", "none", home=tmp_path,
                  env={"HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"})
    line = _one_error_line(result)
    assert result.returncode == 2
    assert "could not download 'streamgen-tests/no-such-model' from the Hugging Face hub" in line
    assert "streamgen pull /path/to/model" in line


def test_a_damaged_build_ends_serve_with_how_to_repair_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    damaged = home / tiny_model_dir.relative_to(tiny_model_dir.parents[2])
    shutil.copytree(tiny_model_dir, damaged)
    (damaged / "model.onnx").write_bytes(b"not a model")
    from streamgen.model_files import Manifest

    result = _run("serve", "--model", Manifest.read(damaged).model, "--quantize", "none", "--no-pull", "--port", "0",
                  home=home)
    line = _one_error_line(result)
    assert result.returncode == 2 and "could not be loaded" in line and f"rm -r '{damaged}'" in line
