"""What a step costs, measured as the engine runs.

The core times every forward pass and every KV copy and feeds the times here.
The scheduler (engine/scheduler.py) plans every step with the estimates:
- a prefix-cache hit is weighed against the wider decode steps it may cost
  (engine/prefix.py), and against the shared prompt pass a short hit would
  cost the row (the reuse rule, `reuse_pays`);
- prompts that start empty rows share a pass while their padding costs less
  than a pass's fixed cost;
- a step with decoding requests runs only the prompt work that fits under
  the inter-token latency target.

Each cost is a line, time = a + b * n, fitted online from exponentially
weighted moments, so it follows the machine as load and thermal state change
and needs no calibration run. Until enough varied samples arrive, the priors
(measured with `streamgen bench cache --costs-only` on the default fp32
build, 2-core CPU) stand in, so the first requests of a run are planned as
the default build runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_DECAY = 0.05  # weight of each new sample: about the last 20 samples matter


@dataclass(slots=True)
class OnlineLine:
    """time_ms ≈ intercept + slope * n, from exponentially weighted moments of (n, time)."""

    intercept: float
    slope: float
    frozen: bool = False  # keep the priors (tests with hand-set costs)
    _n: float = 0.0
    _t: float = 0.0
    _nn: float = 0.0
    _nt: float = 0.0
    _weight: float = 0.0

    def observe(self, n: float, ms: float) -> None:
        if self.frozen:
            return
        a = _DECAY if self._weight else 1.0
        self._n += a * (n - self._n)
        self._t += a * (ms - self._t)
        self._nn += a * (n * n - self._nn)
        self._nt += a * (n * ms - self._nt)
        self._weight = min(1.0, self._weight + a)
        variance = self._nn - self._n * self._n
        if variance > 0.25 * max(1.0, self._n):  # enough spread in n to tell slope from intercept
            self.slope = max(0.0, (self._nt - self._n * self._t) / variance)
            self.intercept = max(0.0, self._t - self.slope * self._n)
        else:  # one n only: keep the slope, move the line through the mean
            self.intercept = max(0.0, self._t - self.slope * self._n)

    def __call__(self, n: float) -> float:
        return self.intercept + self.slope * n


@dataclass(slots=True)
class OnlineMean:
    """An exponentially weighted mean of recent samples, from a prior."""

    value: float

    def observe(self, x: float) -> None:
        self.value += _DECAY * (x - self.value)


@dataclass(slots=True)
class StepCosts:
    """Milliseconds for the parts of a step; priors from `streamgen bench cache --costs-only` on the default
    fp32 build (2-core AVX2 CPU, 2026-11-28, docs/costs.json: a decode step 22 ms at 1 row and 81 ms at 16, a
    prompt pass 22 ms before its first token and 1.8 ms a token after it, a copied token 0.007 ms)."""

    decode: OnlineLine = field(default_factory=lambda: OnlineLine(intercept=19.0, slope=3.6))  # n = rows in the step
    prefill: OnlineLine = field(default_factory=lambda: OnlineLine(intercept=21.7, slope=1.8))  # n = prompt tokens
    copy: OnlineLine = field(default_factory=lambda: OnlineLine(intercept=0.05, slope=0.007))  # n = tokens copied
    # Rows decoding a step, lately: the load a sequence starting now will most likely decode beside.
    rows: OnlineMean = field(default_factory=lambda: OnlineMean(0.0))

    def decode_row_ms(self) -> float:
        """What one more row adds to a decode step."""
        return self.decode.slope

    def prefill_ms_per_token(self) -> float:
        return self.prefill.slope

    def prompt_tokens_within(self, spare_ms: float) -> int:
        """How many prompt tokens one more forward pass can run in spare_ms."""
        return max(0, int((spare_ms - self.prefill.intercept) / max(self.prefill.slope, 1e-6)))
