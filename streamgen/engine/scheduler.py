"""Who runs this step. Pure policy: it sees sequences and counts, never tensors.

- First come, first served: waiting requests take free slots in arrival order
  and join the running batch at the next step boundary.
- A per-step token budget bounds the work of one step: every decoding
  sequence costs one token, and what is left goes to prompt chunks (at most
  `prefill_chunk` tokens each). A long prompt is prefilled over several steps
  while the others keep decoding, instead of freezing them.
- The waiting queue is bounded; beyond it, add() refuses at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from streamgen.engine.sequence import Sequence, SeqStatus


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_slots: int = 16  # sequences decoded together (the KV slots)
    max_waiting: int = 64  # accepted requests waiting for a slot
    token_budget: int = 256  # tokens per step: one per decoding sequence, the rest for prompt chunks
    prefill_chunk: int = 128  # most prompt tokens of one sequence in one step

    def __post_init__(self) -> None:
        for name in ("max_slots", "max_waiting", "token_budget", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class QueueFull(Exception):
    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting


@dataclass(slots=True)
class StepPlan:
    admitted: list[Sequence] = field(default_factory=list)  # need a slot before running
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    decode: list[Sequence] = field(default_factory=list)  # one token each

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode)


class Scheduler:
    def __init__(self, limits: SchedulerLimits) -> None:
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # PREFILLING or DECODING, in admission order

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.limits.max_waiting:
            raise QueueFull(len(self.waiting))
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence leaves at once; its slot is the caller's to free."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self, free_slots: int) -> StepPlan:
        plan = StepPlan(decode=[s for s in self.running if s.status == SeqStatus.DECODING])
        budget = self.limits.token_budget - len(plan.decode)
        while self.waiting and free_slots > 0 and budget > 0:
            seq = self.waiting.popleft()
            plan.admitted.append(seq)
            self.running.append(seq)
            free_slots -= 1
        for seq in self.running:
            if budget <= 0:
                break
            if seq.status == SeqStatus.DECODING:
                continue
            n = min(seq.remaining_prompt, self.limits.prefill_chunk, budget)
            plan.prefill.append((seq, n))
            budget -= n
        return plan
