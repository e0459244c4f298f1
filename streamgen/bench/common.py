"""Pieces the benchmarks share: the fixed request, free ports, a server process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import IO

from streamgen.engine.device import Device
from streamgen.engine.loader import LoadedModel, load_model
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import GenerationRequest, prepare_request
from streamgen.engine.tokenizer import ChatMessage

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle on a stormy night."


def greedy_request(model: LoadedModel, tokens: int) -> GenerationRequest:
    """The benchmarks' request: PROMPT as a chat message, exactly `tokens` greedy tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    return prepare_request(model.tokenizer, model.context_length, params, messages=[ChatMessage("user", PROMPT)])


def load_for_bench(args) -> tuple[LoadedModel, GenerationRequest]:
    """The model named by --model/--quantize/--home (pulled if needed) and the greedy request."""
    from streamgen.models.pull import ensure_model

    model = load_model(ensure_model(args.model, args.quantize, args.home), Device("cpu"), args.threads)
    return model, greedy_request(model, args.tokens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`streamgen serve` on a free loopback port; its output is discarded unless a file is given."""

    def __init__(self, name: str, args: Sequence[str], *, env: Mapping[str, str] | None = None,
                 output: IO[str] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/ws"
        cmd = [sys.executable, "-m", "streamgen", "serve", "--port", str(self.port), "--no-pull", *args]
        sink = output if output is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT,
                                     env={**os.environ, **env} if env else None)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.name} server exited with {self.proc.returncode}{self._details()}")
            try:
                with urllib.request.urlopen(self.url + "/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"the {self.name} server was not ready after {timeout:.0f}s{self._details()}")

    def _details(self) -> str:
        return ""  # subclasses that keep the output add it here

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate it (if it still runs) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve_args(args) -> list[str]:
    """Flags that make a server process use the benchmark's model."""
    flags = ["--model", args.model, "--quantize", args.quantize, "--device", "cpu", "--threads", str(args.threads),
             "--log-level", "warning"]
    return flags + (["--home", args.home] if args.home else [])


class LoggedServe(ServeProcess):
    """`streamgen serve` with its output kept in a temporary file, shown if it fails to start."""

    def __init__(self, name: str, args: Sequence[str]) -> None:
        self.log: IO[str] = tempfile.TemporaryFile("w+")
        super().__init__(name, args, output=self.log)

    def _details(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return ": " + self.log.read()[-2000:]

    def stop(self) -> None:
        super().stop()
        self.log.close()
