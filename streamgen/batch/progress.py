"""What a batch reports: running counts, a progress bar or periodic lines, and the summary.

On a terminal a tqdm bar shows requests done, the ETA (when the input's line count is known), output
tokens/s and failures; elsewhere (a log file, CI) one plain line every PROGRESS_EVERY_S seconds. Both go
to stderr: stdout stays free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

PROGRESS_EVERY_S = 10.0


@dataclass(slots=True)
class Tally:
    """This run's counts so far."""

    written: int = 0  # output lines: answers and errors
    failed: int = 0  # of them, not a 200 answer
    skipped: int = 0  # input lines an earlier run already answered
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Summary:
    tally: Tally
    output: Path
    wall_s: float  # from the first line read to the last line written (the model's loading is not in it)
    busy_s: float  # time the engine spent in steps
    price_per_hour: float | None
    interrupted: bool

    @property
    def tokens_per_s(self) -> float:
        return self.tally.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def utilisation(self) -> float:
        return self.busy_s / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def cost_usd(self) -> float | None:
        """The engine's busy time at the price: what every answer's cost_usd adds up to (plus requests that
        were cancelled by an interruption). Idle time is in utilisation, charged to no one."""
        return None if self.price_per_hour is None else self.busy_s * self.price_per_hour / 3600

    def line(self) -> str:
        t = self.tally
        parts = [f"{t.written} requests ({t.failed} failed" + (f", {t.skipped} done before)" if t.skipped else ")"),
                 f"prompt {t.prompt_tokens} tokens ({t.cached_tokens} cached)", f"output {t.output_tokens} tokens",
                 f"{self.wall_s:.1f} s", f"{self.tokens_per_s:.1f} tok/s", f"utilisation {self.utilisation:.0%}"]
        if (cost := self.cost_usd) is not None:
            per_million = f", ${cost / t.output_tokens * 1e6:.4g} per million output tokens" if t.output_tokens else ""
            parts.append(f"cost ${cost:.6f} at ${self.price_per_hour:g}/h{per_million}")
        head = "interrupted" if self.interrupted else "done"
        tail = f"; run the same command again to resume" if self.interrupted else f" -> {self.output}"
        return f"streamgen batch: {head}: " + " · ".join(parts) + tail


class Progress:
    """Periodic plain lines (not a terminal)."""

    def __init__(self, total: int | None, initial: int, stream: TextIO, every_s: float = PROGRESS_EVERY_S) -> None:
        self.total = total
        self.initial = initial
        self.stream = stream
        self.every_s = every_s
        self._start = time.perf_counter()
        self._next = self._start + every_s

    def update(self, tally: Tally) -> None:
        now = time.perf_counter()
        if now < self._next:
            return
        self._next = now + self.every_s
        done = self.initial + tally.written + tally.skipped
        rate = tally.output_tokens / (now - self._start)
        of = f"/{self.total}" if self.total else ""
        eta = ""
        if self.total and tally.written:
            left = max(0, self.total - done)
            eta = f", eta {_duration(left * (now - self._start) / tally.written)}"
        print(f"streamgen batch: {done}{of} requests, {tally.failed} failed, {rate:.1f} tok/s{eta}",
              file=self.stream, flush=True)

    def close(self) -> None:
        pass


class Bar(Progress):
    """A tqdm bar (a terminal)."""

    def __init__(self, total: int | None, initial: int, stream: TextIO) -> None:
        from tqdm import tqdm

        super().__init__(total, initial, stream, every_s=0.25)
        self._bar = tqdm(total=total, initial=initial, unit="req", file=stream, dynamic_ncols=True,
                         smoothing=0.05, desc="streamgen batch")
        self._tally: Tally | None = None

    def update(self, tally: Tally) -> None:
        self._tally = tally  # the runner's own, still counting: close() shows where it ended
        now = time.perf_counter()
        if now < self._next:
            return
        self._next = now + self.every_s
        self._show(tally, now)

    def _show(self, tally: Tally, now: float) -> None:
        self._bar.set_postfix_str(f"{tally.output_tokens / (now - self._start):.0f} tok/s, {tally.failed} failed",
                                  refresh=False)
        self._bar.update(self.initial + tally.written + tally.skipped - self._bar.n)  # its rate gives the ETA

    def close(self) -> None:
        if self._tally is not None:
            self._show(self._tally, time.perf_counter())
        self._bar.close()


def make_progress(total: int | None, initial: int, stream: TextIO) -> Progress:
    return Bar(total, initial, stream) if stream.isatty() else Progress(total, initial, stream)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
