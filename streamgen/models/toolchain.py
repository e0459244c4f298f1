"""The export toolchain: torch, transformers, Optimum and gguf, kept out of the serving install.

Serving needs ONNX Runtime, a tokenizer and a web server; converting and
exporting a model needs gigabytes more, once per model. So a serving install
(`pip install streamgen`) carries none of the export tools, and the first
`pull` that has work to do creates them in a virtual environment of their own
under the cache directory, `$STREAMGEN_HOME/toolchain`, then runs the pull
there. Later pulls reuse it; `streamgen pull --clean-toolchain` removes it.

Where this interpreter already has the tools (the `export` extra, as
`make test` installs it), the pull runs here and no toolchain is made.

The toolchain's interpreter finds streamgen and the serving packages it
lacks (ONNX Runtime, tokenizers) through paths appended after its own
site-packages: its own versions win, and ONNX Runtime is not installed twice.

What the toolchain installs is the `export` extra in pyproject.toml, read
from streamgen's installed metadata, so that list lives in one place. Where no
NVIDIA GPU is present, PyTorch comes from PyTorch's CPU index (a CUDA build is
gigabytes of libraries a CPU never uses); the index is a setting, for mirrors.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from streamgen.errors import PullError

EXTRA = "export"
INDEX_ENV = "STREAMGEN_TORCH_INDEX_URL"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What a pull imports from the toolchain; all present here means the pull runs in this interpreter.
_MODULES = ("torch", "transformers", "optimum.exporters.onnx", "onnx", "gguf")
_STAMP = "streamgen-toolchain.json"  # written last: a toolchain without it is incomplete and is made again


@dataclass(frozen=True, slots=True)
class Toolchain:
    python: Path  # the interpreter a pull runs in
    here: bool  # that interpreter is this one


def requirements() -> list[str]:
    """The `export` extra's requirements, as pyproject.toml states them."""
    try:
        declared = importlib.metadata.requires("streamgen") or []
    except importlib.metadata.PackageNotFoundError:
        raise PullError("streamgen is not installed (pip install -e .), so its export requirements are "
                        "unknown") from None
    marker = f'extra == "{EXTRA}"'
    return sorted(r.split(";")[0].strip() for r in declared if marker in r.replace("'", '"'))


def has_gpu() -> bool:
    """An NVIDIA driver is loaded: then PyTorch's default (CUDA) build is the one worth downloading."""
    return Path("/proc/driver/nvidia/version").exists()


def index_url(explicit: str | None = None) -> str | None:
    """Where PyTorch comes from: the setting, else PyTorch's CPU index without a GPU, else PyPI (None)."""
    chosen = explicit if explicit is not None else os.environ.get(INDEX_ENV)
    if chosen is not None:
        return chosen or None  # an empty setting means PyPI
    return None if has_gpu() else CPU_INDEX


def directory(home: Path) -> Path:
    return home / "toolchain"


def tools_here() -> bool:
    try:
        return all(importlib.util.find_spec(m) is not None for m in _MODULES)
    except ModuleNotFoundError:  # a parent package (optimum) is missing
        return False


def find(home: Path) -> Toolchain | None:
    """The toolchain a pull would use now, or None when it has to be made first."""
    if tools_here():
        return Toolchain(Path(sys.executable), here=True)
    venv = directory(home)
    stamp = _read_stamp(venv)
    if stamp is not None and stamp.get("requirements") == requirements():
        return Toolchain(_python(venv), here=False)
    return None


def ensure(home: Path, index: str | None = None, out=None) -> Toolchain:
    """The toolchain, made first when missing or made for other requirements (a streamgen upgrade)."""
    out = out or sys.stderr
    if (found := find(home)) is not None:
        return found
    venv = directory(home)
    home.mkdir(parents=True, exist_ok=True)
    with _locked(home / "toolchain.lock"):
        if (found := find(home)) is not None:  # another pull made it while this one waited
            return found
        _create(venv, requirements(), index_url(index), out)
    return Toolchain(_python(venv), here=False)


def clean(home: Path) -> int:
    """Remove the toolchain; returns the bytes freed (0 when there was none)."""
    venv = directory(home)
    if not venv.exists():
        return 0
    with _locked(home / "toolchain.lock"):
        size = disk_usage(venv)
        shutil.rmtree(venv)
    return size


def disk_usage(path: Path) -> int:
    """Bytes of the files under path, each hard-linked file once (as `du` counts)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def run_pull(toolchain: Toolchain, argv: Sequence[str], out=None) -> None:
    """`streamgen pull ARGV` in the toolchain's interpreter, its progress copied to out (stderr)."""
    paths = [str(Path(__file__).resolve().parents[2]), *_serving_paths()]
    bootstrap = ("import sys; n = int(sys.argv[1]); sys.path.extend(sys.argv[2:2 + n]); "
                 "from streamgen.cli import main; sys.exit(main(sys.argv[2 + n:]))")
    cmd = [str(toolchain.python), "-c", bootstrap, str(len(paths)), *paths, "pull", *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    if (code := _stream(cmd, out or sys.stderr, env)) != 0:
        raise PullError(f"the pull in the export toolchain ({toolchain.python}) failed (exit {code}); its "
                        "output is above")


# ---- making it -----------------------------------------------------------------------------------------------


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _read_stamp(venv: Path) -> dict | None:
    try:
        return json.loads((venv / _STAMP).read_text())
    except (OSError, ValueError):
        return None


def _serving_paths() -> list[str]:
    """This interpreter's site-packages: the serving packages the toolchain does not install itself."""
    return [p for p in (*site.getsitepackages(), site.getusersitepackages()) if Path(p).is_dir()]


def _create(venv: Path, reqs: list[str], index: str | None, out) -> None:
    if venv.exists():  # incomplete, or made for other requirements
        shutil.rmtree(venv)
    where = f"PyTorch from {index}" if index else "PyTorch from PyPI"
    print(f"streamgen: creating the export toolchain (torch, transformers, Optimum) in {venv}, once; {where}. "
          f"`streamgen pull --clean-toolchain` removes it.", file=out, flush=True)
    start = time.monotonic()
    _step(out, [sys.executable, "-m", "venv", str(venv)], "creating the virtual environment")
    pip = [str(_python(venv)), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "on"]
    if index:
        pip += ["--extra-index-url", index]
    _step(out, [*pip, *reqs], f"installing {len(reqs)} packages: {' '.join(reqs)}")
    stamp = {"requirements": reqs, "index_url": index, "python": sys.version.split()[0],
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (venv / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"streamgen: export toolchain ready in {time.monotonic() - start:.0f}s, "
          f"{disk_usage(venv) / 2**20:.0f} MiB in {venv}", file=out, flush=True)


def _step(out, cmd: list[str], label: str) -> None:
    print(f"streamgen: toolchain: {label}", file=out, flush=True)
    # pip's own lines (Collecting, Downloading with sizes, Installing) are the progress of this step.
    if (code := _stream(cmd, out)) != 0:
        raise PullError(f"making the export toolchain failed while {label} (exit {code}; pip's output is above). "
                        f"Set {INDEX_ENV} (or --torch-index-url) to a reachable PyTorch index, or install the "
                        "tools into this environment: pip install 'streamgen[export]'")


def _stream(cmd: list[str], out, env: dict[str, str] | None = None) -> int:
    """Run cmd with both its streams copied line by line to out, so that stdout stays the caller's answer."""
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          env=env, text=True, errors="replace", bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            out.flush()
    return proc.returncode


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
