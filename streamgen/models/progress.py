"""Stage-by-stage progress for long model work, on stderr.

Download and GGUF conversion show their own byte/tensor bars (pip's and
transformers'); the stages between them (export, quantization) give no
progress of their own, so a ticking elapsed-time line shows that work goes on.
On a non-terminal (CI logs) each stage prints one start and one end line.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class StageProgress:
    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self._index = 0
        self._tty = self.stream.isatty()

    def note(self, message: str) -> None:
        self.stream.write(f"      {message}\n")
        self.stream.flush()

    @contextmanager
    def stage(self, label: str, *, spinner: bool = True) -> Iterator[None]:
        """One stage. spinner=False for stages whose tool draws its own bar."""
        self._index += 1
        head = f"[{self._index}/{self.total}] {label}"
        start = time.monotonic()
        stop = threading.Event()
        ticker = None
        if self._tty and spinner:
            ticker = threading.Thread(target=self._tick, args=(head, start, stop), daemon=True)
            ticker.start()
        else:
            self.stream.write(f"{head} ...\n")
            self.stream.flush()
        try:
            yield
        except BaseException:
            self._finish(stop, ticker, f"{head} failed after {time.monotonic() - start:.1f}s")
            raise
        self._finish(stop, ticker, f"{head} done in {time.monotonic() - start:.1f}s")

    def _finish(self, stop: threading.Event, ticker: threading.Thread | None, line: str) -> None:
        stop.set()
        if ticker is not None:
            ticker.join()
            self.stream.write("\r\033[K")
        self.stream.write(line + "\n")
        self.stream.flush()

    def _tick(self, head: str, start: float, stop: threading.Event) -> None:
        frames = "|/-\\"
        n = 0
        while not stop.wait(0.25):
            self.stream.write(f"\r\033[K{frames[n % 4]} {head}  {time.monotonic() - start:5.0f}s")
            self.stream.flush()
            n += 1
