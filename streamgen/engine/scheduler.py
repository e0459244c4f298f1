"""Who runs this step. Pure policy: it sees sequences and counts, never tensors.

A step is planned in two moves, because taking a slot can change how much
of a prompt is left to run (a prefix-cache hit):
1. admit(): first come, first served, waiting requests take free slots and
   join the running batch at this step boundary;
2. plan(): every decoding sequence gets one token; the per-step token budget
   left over goes to prompt chunks (at most `prefill_chunk` tokens of one
   sequence per step), in admission order. A long prompt is prefilled over
   several steps while the others keep decoding, instead of freezing them.
   With an inter-token latency target, a step that decodes also runs only as
   many prompt tokens as fit in the target beside the decode, by the step
   costs measured so far (engine/costs.py), counting each sequence's chunk as
   a forward pass of its own, fixed cost included (chunks that start empty
   rows may then share one pass, engine/prompt_passes.py, so the count errs
   on the safe side): streams do not stall
   behind other users' prompts (the idea of Sarathi-Serve's stall-free batching).
   A target below what the decode alone costs cannot be held; prompts then
   still get a quarter of the decode's time (PROMPT_FLOOR_SHARE), and never
   fewer than MIN_PREFILL_PASS tokens, so no prompt starves and throughput
   does not collapse (at 16 clients, a floor of two tokens a step did). A
   step with nothing to decode is not limited.
   A chunk is never a single token on top of a past (see chunk_size), so a
   prompt cut differently still gives bit-identical results.

With prefix sharing on, a prompt whose next tokens another sequence is
prefilling in this very step waits one step and then copies them (the core's
catch-up), instead of running the same tokens twice: sixteen requests with
one long system prompt prefill it once.

The waiting queue is bounded; beyond it, add() refuses at once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from streamgen.engine.costs import StepCosts
from streamgen.engine.slot_table import MIN_PREFILL_PASS, chunk_size, common_prefix
from streamgen.engine.config import ENGINE_DEFAULTS, EngineConfig
from streamgen.engine.sequence import Sequence, SeqStatus

# The least share of a decoding step's time that goes to prompts when the ITL target leaves less.
PROMPT_FLOOR_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    max_waiting: int = ENGINE_DEFAULTS.max_queued  # accepted requests waiting for a slot
    token_budget: int = ENGINE_DEFAULTS.token_budget  # tokens per step: one per decoding sequence, the rest prompt
    prefill_chunk: int = ENGINE_DEFAULTS.prefill_chunk  # most prompt tokens of one sequence in one step
    share_prefixes: bool = True  # defer a prompt whose next tokens another sequence computes this step
    itl_target_ms: float | None = None  # a decoding step's time target; prompt work beside it is sized to fit

    def __post_init__(self) -> None:
        for name in ("max_waiting", "token_budget", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config: EngineConfig) -> SchedulerLimits:
        return cls(config.max_queued, config.token_budget, config.prefill_chunk, share_prefixes=config.prefix_cache,
                   itl_target_ms=config.itl_target_ms)


class QueueFull(Exception):
    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting


@dataclass(slots=True)
class StepPlan:
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    decode: list[Sequence] = field(default_factory=list)  # one token each


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
        """A finished or aborted sequence leaves at once; its slot is the caller's to release."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def admit(self, free_slots: int) -> list[Sequence]:
        """Waiting sequences that take a slot now, in arrival order; the caller gives each its slot."""
        decoding = sum(1 for s in self.running if s.status == SeqStatus.DECODING)
        admitted = []
        # No prompt budget left this step: a slot taken now would sit idle.
        while self.waiting and free_slots > 0 and self.limits.token_budget > decoding:
            seq = self.waiting.popleft()
            admitted.append(seq)
            self.running.append(seq)
            free_slots -= 1
        return admitted

    def plan(self, costs: StepCosts | None = None) -> StepPlan:
        plan = StepPlan(decode=[s for s in self.running if s.status == SeqStatus.DECODING])
        budget = self.limits.token_budget - len(plan.decode)
        spare_ms = None  # with a latency target: the time left in this step for prompt passes
        if plan.decode and self.limits.itl_target_ms and costs is not None:
            rows = max(s.slot for s in plan.decode) + 1  # a decode step runs every row up to the highest
            decode_ms = costs.decode(rows)
            spare_ms = max(self.limits.itl_target_ms - decode_ms, PROMPT_FLOOR_SHARE * decode_ms)
        for seq in self.running:
            if budget <= 0:
                break
            if seq.status != SeqStatus.PREFILLING:
                continue
            if self.limits.share_prefixes and _computed_by_another(seq, plan.prefill, costs):
                continue
            limit = min(self.limits.prefill_chunk, budget)
            if spare_ms is not None:
                # Each sequence's chunk is a forward pass of its own, which pays the pass's fixed cost
                # (reading every weight) before its tokens: a second chunk runs only if it fits whole.
                fits = costs.prompt_tokens_within(spare_ms)
                if plan.prefill and fits < MIN_PREFILL_PASS:
                    break
                limit = min(limit, max(MIN_PREFILL_PASS, fits))
            n = chunk_size(seq.remaining_prompt, limit)
            plan.prefill.append((seq, n))
            budget -= n
            if spare_ms is not None:
                spare_ms -= costs.prefill(n)
        return plan


def _computed_by_another(seq: Sequence, planned: list[tuple[Sequence, int]], costs: StepCosts | None) -> bool:
    """Whether a sequence already planned this step computes seq's next prompt tokens, enough of them to be
    worth a step's wait and a copy: the same tokens at the same positions, from a cache no further along."""
    for other, n in planned:
        start = other.prefilled
        if other.namespace != seq.namespace or not start <= seq.prefilled < start + n:
            continue
        shared = min(common_prefix(other.prompt_array, seq.prompt_array), start + n) - seq.prefilled
        # Both prompts new: without the wait, seq could share other's pass instead of copying from it.
        sharing = seq.prefilled == 0 and start == 0
        if shared > 0 and (costs is None or costs.reuse_pays(shared, share_pass=sharing)):
            return True
    return False
