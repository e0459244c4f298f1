"""The engine's busy time and output over the last minute: utilisation, and what a token costs.

The core reports every step's duration and the engine every delivered token;
/v1/stats reads the window. Written by the worker thread, read by the event
loop: appends to a deque and a snapshot copy are safe without a lock.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class Window:
    seconds: float  # how long the window is (less right after start-up)
    busy_s: float  # time spent in steps
    output_tokens: int

    @property
    def utilisation(self) -> float:
        return self.busy_s / self.seconds if self.seconds > 0 else 0.0

    def cost_per_million_tokens(self, price_per_hour: float) -> float | None:
        """The busy time's share of the price, per million output tokens (idle time is nobody's)."""
        if not self.output_tokens:
            return None
        return self.busy_s * price_per_hour / 3600 / self.output_tokens * 1e6


class Ledger:
    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._started = time.monotonic()
        self._steps: deque[tuple[float, float]] = deque()  # (when, seconds)
        self._tokens: deque[tuple[float, int]] = deque()  # (when, count)

    def step(self, seconds: float) -> None:
        self._steps.append((time.monotonic(), seconds))
        self._trim(self._steps)

    def tokens(self, count: int) -> None:
        if count:
            self._tokens.append((time.monotonic(), count))
            self._trim(self._tokens)

    def window(self) -> Window:
        now = time.monotonic()
        since = now - self.window_s
        busy = sum(s for t, s in list(self._steps) if t >= since)
        tokens = sum(n for t, n in list(self._tokens) if t >= since)
        return Window(min(self.window_s, now - self._started), busy, tokens)

    def _trim(self, entries: deque) -> None:
        cutoff = time.monotonic() - self.window_s
        while entries and entries[0][0] < cutoff:
            entries.popleft()
