"""Stage-by-stage progress for long model work, on stderr.

Download and GGUF conversion show their own byte/tensor bars (pip's and
transformers'); the stages between them (export, quantization) give no
progress of their own, so a ticking elapsed-time line shows that work goes on.
On a non-terminal (CI logs) each stage prints one start and one end line.

A pull that runs in the export toolchain's interpreter (models/toolchain.py)
writes into a pipe, not a terminal. There EVENTS_ENV is set, and each stage's
start and end go out as one machine-readable line (EVENT_PREFIX + JSON); the
parent's StageRelay draws them on its own stderr, ticking timer included, and
passes every other line through.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

EVENTS_ENV = "STREAMGEN_STAGE_EVENTS"  # "1": stages are reported as event lines for a parent process to draw
EVENT_PREFIX = "streamgen-stage: "


class StageProgress:
    def __init__(self, total: int, stream: TextIO | None = None, events: bool | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self._index = 0
        self._events = os.environ.get(EVENTS_ENV) == "1" if events is None else events

    def note(self, message: str) -> None:
        self.stream.write(f"      {message}\n")
        self.stream.flush()

    @contextmanager
    def stage(self, label: str, *, spinner: bool = True) -> Iterator[None]:
        """One stage. spinner=False for stages whose tool draws its own bar."""
        self._index += 1
        head = f"[{self._index}/{self.total}] {label}"
        if self._events:
            with self._reported(head, spinner):
                yield
            return
        line = StageLine(self.stream, head, spinner)
        try:
            yield
        except BaseException:
            line.finish(ok=False)
            raise
        line.finish(ok=True)

    @contextmanager
    def _reported(self, head: str, spinner: bool) -> Iterator[None]:
        start = time.monotonic()
        self._event({"start": head, "spinner": spinner})
        try:
            yield
        except BaseException:
            self._event({"end": "failed", "seconds": round(time.monotonic() - start, 1)})
            raise
        self._event({"end": "done", "seconds": round(time.monotonic() - start, 1)})

    def _event(self, event: dict) -> None:
        self.stream.write(EVENT_PREFIX + json.dumps(event) + "\n")
        self.stream.flush()


class StageLine:
    """One stage on a stream: on a terminal a line that ticks the seconds (spinner) until finish(); elsewhere,
    or without a spinner, a start line. finish() writes the end line. Lines of other output written through
    write() while it ticks clear the ticking line first, and it is drawn again at the next tick."""

    def __init__(self, stream: TextIO, head: str, spinner: bool = True) -> None:
        self.stream = stream
        self.head = head
        self.start = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn = False
        self._ticker: threading.Thread | None = None
        if spinner and stream.isatty():
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        else:
            self._put(f"{head} ...\n")

    def write(self, text: str) -> None:
        with self._lock:
            if self._drawn:
                self.stream.write("\r\033[K")
                self._drawn = False
            self.stream.write(text)
            self.stream.flush()

    def finish(self, ok: bool, seconds: float | None = None) -> None:
        seconds = time.monotonic() - self.start if seconds is None else seconds
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        self.write(f"{self.head} done in {seconds:.1f}s\n" if ok else f"{self.head} failed after {seconds:.1f}s\n")

    def _put(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def _tick(self) -> None:
        frames = "|/-\\"
        n = 0
        while not self._stop.wait(0.25):
            with self._lock:
                self.stream.write(f"\r\033[K{frames[n % 4]} {self.head}  {time.monotonic() - self.start:5.0f}s")
                self.stream.flush()
                self._drawn = True
            n += 1


class StageRelay:
    """Draws the stage events of a child process's output (StageProgress with EVENTS_ENV set) on stream, and
    passes every other line through: feed() each line as it comes, close() at the end."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._tty = stream.isatty()
        self._stage: StageLine | None = None

    def feed(self, line: str) -> None:
        if line.startswith(EVENT_PREFIX):
            try:
                event = json.loads(line[len(EVENT_PREFIX):])
            except ValueError:
                event = None
            if isinstance(event, dict):
                self._handle(event)
                return
        if not self._tty and "\r" in line:  # a progress bar: in a log, only its last state
            line = line.rstrip("\n").rsplit("\r", 1)[-1] + "\n"
            if not line.strip():
                return
        if self._stage is not None:
            self._stage.write(line)
        else:
            self.stream.write(line)
            self.stream.flush()

    def close(self) -> None:
        """The child ended: a stage it started and never ended failed with it."""
        if self._stage is not None:
            self._stage.finish(ok=False)
            self._stage = None

    def _handle(self, event: dict) -> None:
        if "start" in event:
            self.close()
            self._stage = StageLine(self.stream, str(event["start"]), bool(event.get("spinner", True)))
        elif "end" in event and self._stage is not None:
            seconds = event.get("seconds")
            self._stage.finish(ok=event["end"] == "done", seconds=float(seconds) if seconds is not None else None)
            self._stage = None
