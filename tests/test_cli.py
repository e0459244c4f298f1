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


# Every failure the docs name for the command line (ERROR_CODES' "cli" codes, the README's flags and
# environment), walked: exactly one error line, and it says what to do. An argument the parser refuses prints
# its usage first, then its one line, with the flag's range or choices. The hub id that cannot be reached is
# walked in tests/test_pull.py.
FAILURES = [
    (("serve", "--no-pull", "--port", "0"), {}, "streamgen: error: ", "streamgen pull"),
    (("serve", "--port", "99999"), {}, "streamgen serve: error: ", "between 0 and 65535"),
    (("serve", "--max-batch", "0"), {}, "streamgen serve: error: ", "at least 1"),
    (("serve", "--quantize", "int3"), {}, "streamgen serve: error: ", "one of none, int8, int4, source"),
    (("serve",), {"STREAMGEN_RATE_LIMIT": "-5"}, "streamgen: error: ", "STREAMGEN_RATE_LIMIT must be at least 0"),
    (("serve",), {"STREAMGEN_LOG_PROMPTS": "maybe"}, "streamgen: error: ", "true or false"),
    (("serve", "--api-key", "short"), {}, "streamgen: error: ", "secrets.token_urlsafe"),
    (("serve", "--api-key-file", "/nonexistent/keys"), {}, "streamgen: error: ", "cannot read API keys"),
    (("serve", "--device", "cuda", "--port", "0"), {}, "streamgen: error: ", "--device"),
    (("generate", "--temperature", "hot", "x"), {}, "streamgen generate: error: ", "invalid float"),
    (("pull", "/nonexistent/model/dir"), {}, "streamgen: error: ", ""),
    (("batch", "/nonexistent/requests.jsonl", "-o", "/tmp/out.jsonl"), {}, "streamgen: error: ", "no such file"),
]


@pytest.mark.parametrize("args,env,prefix,what", FAILURES, ids=[" ".join(a)[:40] for a, _, _, _ in FAILURES])
def test_every_documented_failure_is_one_line(tmp_path: Path, args, env, prefix: str, what: str) -> None:
    result = _run(*args, env=env, home=tmp_path)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(prefix), result.stderr
    assert what in errors[0] and "Traceback" not in result.stderr

