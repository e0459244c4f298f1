"""The export toolchain: torch, transformers, Optimum and gguf, kept out of the serving install.

Serving needs ONNX Runtime, a tokenizer and a web server; converting and
exporting a model needs gigabytes more, once per model. So a serving install
(`pip install .` in the checkout) carries none of the export tools, and the first
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
An extra index is handed to pip only after it answered within two seconds
(`usable_index`): where it does not, pip would retry it five times for every
package, so the install falls back to PyPI alone and says so in one line.

pip's own output is condensed (PipOutput): a counter on a terminal, a line per
large download and per install step, every error and each kind of warning
once. `python -m streamgen.models.toolchain pip-install LABEL ARGS...` runs one
such install with a start and an end line (the Makefile's installs).
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from streamgen import DISTRIBUTION
from streamgen.errors import PullError

EXTRA = "export"
INDEX_ENV = "STREAMGEN_TORCH_INDEX_URL"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
INDEX_TIMEOUT = 2.0  # seconds an extra index has to answer before pip is given it
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
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise PullError(f"streamgen is not installed (no {DISTRIBUTION} distribution: pip install -e . in the "
                        "checkout), so its export requirements are unknown") from None
    marker = f'extra == "{EXTRA}"'
    return sorted(r.split(";")[0].strip() for r in declared if marker in r.replace("'", '"'))


def has_gpu() -> bool:
    """An NVIDIA driver is loaded: then PyTorch's default (CUDA) build is the one worth downloading."""
    return Path("/proc/driver/nvidia/version").exists()


def index_url(explicit: str | None = None) -> str | None:
    """Where PyTorch should come from: the setting, else PyTorch's CPU index without a GPU, else PyPI (None).
    usable_index checks that it answers."""
    chosen = explicit if explicit is not None else os.environ.get(INDEX_ENV)
    if chosen is not None:
        return chosen or None  # an empty setting means PyPI
    return None if has_gpu() else CPU_INDEX


def usable_index(explicit: str | None = None, out: TextIO | None = None,
                 timeout: float = INDEX_TIMEOUT) -> str | None:
    """index_url(), if it answers within timeout seconds; else None (pip's default index), said in one line
    on out.

    What `make install` and the toolchain hand pip. An index that does not answer would cost pip five
    retries for every package it resolves (minutes, and a screen of warnings) before it fails."""
    index = index_url(explicit)
    if index is None or (failure := unanswered(index, timeout)) is None:
        return index
    print(f"streamgen: the PyTorch index {index} does not answer ({failure}), so torch comes from pip's default "
          "index (PyPI), whose Linux wheel is the CUDA build, gigabytes larger than the CPU one; for a mirror of "
          f"the CPU index set {INDEX_ENV}=URL (or --torch-index-url), or {INDEX_ENV}= (empty) for PyPI without "
          "this check", file=out or sys.stderr, flush=True)
    return None


def answers(url: str, timeout: float = INDEX_TIMEOUT) -> bool:
    """Whether a package index answers at url within timeout seconds."""
    return unanswered(url, timeout) is None


def unanswered(url: str, timeout: float = INDEX_TIMEOUT) -> str | None:
    """None when the package index at url answers within timeout seconds (any HTTP status below 500: pip asks
    for the project pages under it), else why not. A file:// index answers when its directory exists."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return None if Path(urllib.request.url2pathname(parsed.path)).is_dir() else "no such directory"
    if parsed.scheme not in ("http", "https"):
        return f"pip cannot use a {parsed.scheme or 'schemeless'} URL"
    result: list[str | None] = []

    def ask() -> None:
        request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "streamgen index check"})
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                result.append(None)
        except urllib.error.HTTPError as exc:  # it answered, with a status
            result.append(None if exc.code < 500 else f"HTTP {exc.code}")
        except urllib.error.URLError as exc:  # refused, unresolvable, TLS
            result.append(str(getattr(exc.reason, "strerror", None) or exc.reason))
        except (OSError, ValueError) as exc:  # timed out, or a malformed URL
            result.append(str(exc) or type(exc).__name__)

    # In a thread, so that a name lookup (which urllib's timeout does not cover) cannot hold it up either.
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(timeout + 0.5)
    return result[0] if result else f"no answer within {timeout:.0f} s"


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
        _create(venv, requirements(), usable_index(index, out), out)
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
    """`streamgen pull ARGV` in the toolchain's interpreter, its progress shown on out (stderr).

    The child reports its stages as events (progress.EVENTS_ENV) that this process draws, ticking timer
    included, as if the pull ran here. Its error line becomes this process's PullError, so a failed pull
    still ends in one `streamgen: error:` line; its stdout (the model's directory, which the caller prints)
    is not copied."""
    from streamgen.models.progress import EVENTS_ENV, StageRelay

    out = out or sys.stderr
    paths = [str(Path(__file__).resolve().parents[2]), *_serving_paths()]
    bootstrap = ("import sys; n = int(sys.argv[1]); sys.path.extend(sys.argv[2:2 + n]); "
                 "from streamgen.cli import main; sys.exit(main(sys.argv[2 + n:]))")
    cmd = [str(toolchain.python), "-c", bootstrap, str(len(paths)), *paths, "pull", *argv]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env[EVENTS_ENV] = "1"
    relay = StageRelay(out)
    errors: list[str] = []

    def line(text: str) -> None:
        if text.startswith(_ERROR_PREFIX):
            errors.append(text[len(_ERROR_PREFIX):].rstrip("\n"))
        else:
            relay.feed(text)

    with tempfile.TemporaryFile("w+", errors="replace") as stdout:
        try:
            code = _stream(cmd, line, env, stdout=stdout)
        finally:
            relay.close()
        stdout.seek(0)
        printed = stdout.read().splitlines()
    for text in printed[:-1] if code == 0 else printed:  # the last line of a pull that worked is its directory
        out.write(text + "\n")
    if code != 0:
        if errors:
            raise PullError(errors[-1])
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
    pip = [str(_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
    if index:
        pip += ["--extra-index-url", index]
    _step(out, [*pip, *reqs], f"installing {len(reqs)} packages: {' '.join(reqs)}", pip=True)
    stamp = {"requirements": reqs, "index_url": index, "python": sys.version.split()[0],
             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (venv / _STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"streamgen: export toolchain ready in {time.monotonic() - start:.0f}s, "
          f"{disk_usage(venv) / 2**20:.0f} MiB in {venv}", file=out, flush=True)


def _step(out, cmd: list[str], label: str, pip: bool = False) -> None:
    print(f"streamgen: toolchain: {label}", file=out, flush=True)
    start = time.monotonic()
    shown = PipOutput(out) if pip else None
    code = _stream([*cmd, "--progress-bar", "off"] if pip else cmd, shown.feed if shown else _copy_to(out))
    if shown:
        shown.close(code)
    if code != 0:
        raise PullError(f"making the export toolchain failed while {label} (exit {code}; pip's output is above). "
                        f"Set {INDEX_ENV} (or --torch-index-url) to a reachable PyTorch index, or install the "
                        f"tools into this environment: pip install '{DISTRIBUTION}[export]' (in the checkout: "
                        "pip install '.[export]')")
    if shown:
        print(f"streamgen: toolchain: {shown.summary()} in {time.monotonic() - start:.0f} s", file=out, flush=True)


def _copy_to(out: TextIO) -> Callable[[str], None]:
    def copy(line: str) -> None:
        out.write(line)
        out.flush()
    return copy


_ERROR_PREFIX = "streamgen: error: "


def _stream(cmd: list[str], on_line: Callable[[str], None], env: dict[str, str] | None = None,
            stdout: TextIO | None = None) -> int:
    """Run cmd and hand each line it writes (stderr, and stdout unless a file is given for it) to on_line.

    Lines are split at newlines only: a progress bar's carriage returns stay inside its line, for on_line to
    draw (a terminal) or to cut to its last state."""
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout or subprocess.PIPE,
                          stderr=subprocess.PIPE if stdout else subprocess.STDOUT, env=env) as proc:
        stream = proc.stderr if stdout else proc.stdout
        assert stream is not None
        for raw in stream:
            on_line(raw.decode("utf-8", errors="replace"))
    return proc.returncode


# ---- pip's output, condensed ---------------------------------------------------------------------------------


_SIZE = re.compile(r"\((\d+(?:\.\d+)?) (kB|MB|GB)\)")
_UNIT = {"kB": 1e3, "MB": 1e6, "GB": 1e9}
_NAMES = re.compile(r"'[^']*'|\"[^\"]*\"|\S*/\S*|\d+")  # quoted names, URLs and paths, numbers
BIG_DOWNLOAD = 20e6  # bytes: a download this large gets its own line (it is where an install's time goes)


@dataclass
class PipOutput:
    """What a person needs from `pip install`'s output, on out:

    - on a terminal, one line rewritten in place: packages collected, downloads and their size so far;
    - a line for each download of BIG_DOWNLOAD bytes or more, and one when pip starts installing;
    - every error line, and everything after it (pip's error blocks span several lines);
    - each kind of warning once, with how many were left out at the end (kinds differ in more than quoted
      names, URLs, paths, numbers and details in parentheses: pip retrying an index that does not answer warns
      once per try and package);
    - when pip fails without an error line, its last lines.
    """

    out: TextIO
    tty: bool | None = None
    collected: int = 0
    satisfied: int = 0
    downloads: int = 0
    downloaded: float = 0.0  # bytes
    installed: int = 0
    _kinds: dict[str, int] = field(default_factory=dict)
    _tail: list[str] = field(default_factory=list)
    _failing: bool = False
    _status: bool = False  # a counter line is drawn and must be cleared before the next line

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = self.out.isatty()

    def feed(self, line: str) -> None:
        text = line.rstrip("\n").split("\r")[-1].rstrip()
        stripped = text.strip()
        if not stripped:
            return
        self._tail = (self._tail + [text])[-30:]
        if self._failing or stripped.lower().startswith(("error:", "error ")):
            self._failing = True
            self._print(text)
        elif stripped.startswith(("WARNING:", "DEPRECATION:")):
            kind = _NAMES.sub("_", stripped).split("(")[0]  # pip's retries differ in their details only
            self._kinds[kind] = self._kinds.get(kind, 0) + 1
            if self._kinds[kind] == 1:
                self._print(text)
        elif stripped.startswith(("Collecting ", "Obtaining ", "Processing ")):
            self.collected += 1
            self._count(stripped.split()[1])
        elif stripped.startswith("Requirement already satisfied:"):
            self.satisfied += 1
        elif stripped.startswith("Downloading "):
            size = _SIZE.search(stripped)
            nbytes = float(size.group(1)) * _UNIT[size.group(2)] if size else 0.0
            self.downloads += 1
            self.downloaded += nbytes
            name = stripped.split()[1].rsplit("/", 1)[-1]
            if nbytes >= BIG_DOWNLOAD:
                self._print(f"  downloading {name} ({nbytes / 1e6:.0f} MB)")
            else:
                self._count(name)
        elif stripped.startswith("Installing collected packages:"):
            names = stripped.split(":", 1)[1].split(",")
            self._print(f"  installing {len(names)} package{'s' * (len(names) != 1)} ...")
        elif stripped.startswith("Successfully installed "):
            self.installed = len(stripped.split()) - 2

    def close(self, code: int = 0) -> None:
        self._clear()
        hidden = sum(n - 1 for n in self._kinds.values())
        if hidden:
            self._print(f"  ({hidden} repeated pip warning{'s' * (hidden != 1)} not shown)")
        if code != 0 and not self._failing:
            for text in self._tail:
                self._print(text)

    def summary(self) -> str:
        parts = [f"{self.installed} package{'s' * (self.installed != 1)} installed"]
        if self.downloads:
            parts.append(f"{self.downloads} downloaded ({self.downloaded / 1e6:.0f} MB)")
        if self.satisfied:
            parts.append(f"{self.satisfied} already there")
        return ", ".join(parts)

    def _count(self, name: str) -> None:
        if not self.tty:
            return
        mb = f", {self.downloaded / 1e6:.0f} MB" if self.downloaded else ""
        status = f"  {self.collected} packages collected, {self.downloads} downloaded{mb}: {name}"
        self.out.write("\r\033[K" + status[:110])
        self.out.flush()
        self._status = True

    def _clear(self) -> None:
        if self._status:
            self.out.write("\r\033[K")
            self._status = False

    def _print(self, text: str) -> None:
        self._clear()
        self.out.write(text + "\n")
        self.out.flush()


def pip_install(label: str, args: Sequence[str], *, torch_index: bool = False, out: TextIO | None = None,
                python: str | None = None) -> int:
    """`pip install ARGS` with condensed output between a start and an end line; returns pip's exit status.
    torch_index: PyTorch from usable_index() (the Makefile's full install)."""
    out = out or sys.stderr
    cmd = [python or sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar",
           "off"]
    if torch_index and (index := usable_index(out=out)):
        cmd += ["--extra-index-url", index]
    print(f"installing {label} ...", file=out, flush=True)
    start = time.monotonic()
    shown = PipOutput(out)
    code = _stream([*cmd, *args], shown.feed)
    shown.close(code)
    took = time.monotonic() - start
    if code == 0:
        print(f"installing {label}: done in {took:.0f} s ({shown.summary()})", file=out, flush=True)
    else:
        print(f"installing {label}: pip failed after {took:.0f} s (exit {code}); its errors are above", file=out,
              flush=True)
    return code


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m streamgen.models.toolchain pip-install [--torch-index] LABEL PIP_ARGS...` (the Makefile)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m streamgen.models.toolchain")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pip-install", help="pip install with condensed output, a start and an end line")
    p.add_argument("--torch-index", action="store_true",
                   help=f"PyTorch from {INDEX_ENV}, else its CPU index without a GPU, if it answers")
    p.add_argument("label", help="what is installed, for the start and end lines")
    p.add_argument("pip_args", nargs=argparse.REMAINDER, help="pip install's arguments")
    args = parser.parse_args(argv)
    return pip_install(args.label, args.pip_args, torch_index=args.torch_index, out=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
