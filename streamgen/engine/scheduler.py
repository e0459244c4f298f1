"""Who runs this step, and how: `Scheduler.schedule()` returns the step's plan as data.

This is the one place that decides where a request goes and why. It reads
the queue, the slot table and the measured step costs, and changes none of
them: the plan it returns is executed by engine/executor.py and its outcome
applied by the core's update (engine/core.py). A plan lists, in order:

1. **Claims.** First come, first served, waiting requests take free slots at
   this step boundary, while the step has token budget left for their
   prompts. With the prefix cache on, each takes the slot engine/prefix.py
   scores best (the one holding the longest prefix of its prompt, weighed
   against widening every decode step), keeps what that slot holds of its
   prompt, and may first move the slot's other contents to a free row that
   holds something less recent.
2. **Prefix copies.** A prompt whose next tokens another row holds further,
   busy or free, copies them from it: a KV copy costs a small fraction of
   running them (the "catch-up").
3. **Prompt passes.** The per-step token budget left after decoding goes to
   prompt chunks (at most `prefill_chunk` tokens of one sequence), in
   admission order: a long prompt runs over several steps while the others
   keep decoding. With an inter-token latency target, a step that decodes
   runs only the prompt work that fits beside the decode by the measured
   costs, counting each chunk as a forward pass of its own, fixed cost
   included (Sarathi-Serve's stall-free batching); a target below the decode
   step's own cost still gives prompts PROMPT_FLOOR_SHARE of it, so none
   starves. A prompt whose next tokens another chunk of this step computes
   waits a step and then copies them, instead of running them twice. Chunks
   that start empty rows share one forward pass while their padding costs
   less than the pass it saves (GroupQueryAttention batches prompts only
   without a past); every other chunk runs alone. No chunk is a single token
   on top of a past (engine/slot_table.py, MIN_PREFILL_PASS), so a prompt cut
   anyhow gives bit-identical results.
4. **Decode rows and verification passes.** Every sequence whose prompt is in
   the cache gets one token in the batched decode pass, except a speculative
   one whose own context offers proposals: it gets a verification pass of its
   own (engine/speculation.py). Whether a sequence speculates is decided once,
   at its claim: when the tokens a verification pass is expected to give
   (measured) over its cost beat the sequence's share of the batched decode
   at the load then, or always with the "always" policy. At high load none
   does.

The reuse rule (does taking n tokens from the cache beat computing them?) is
`reuse_pays` below, applied to slot choice, catch-up copies and deferral
alike. The waiting queue is bounded; beyond it, add() refuses at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from streamgen.engine.config import ENGINE_DEFAULTS, EngineConfig
from streamgen.engine.costs import StepCosts
from streamgen.engine.prefix import best_source, choose_slot
from streamgen.engine.sequence import Sequence, SeqStatus
from streamgen.engine.slot_table import MIN_PREFILL_PASS, SlotTable, chunk_size, common_prefix, move_row
from streamgen.engine.speculation import propose

# The least share of a decoding step's time that goes to prompts when the ITL target leaves less.
PROMPT_FLOOR_SHARE = 0.25
# The tokens a verification pass is expected to give when deciding whether a request speculates: about what
# the grounded workloads of `streamgen bench speculation` get (proposals kept and one token more). A constant, not
# a running mean of recent passes: with one, requests that kept little (stories) turned speculation off for a
# grounded request that came after them, alone on the server. A request whose proposals are not kept is held
# back by its own draft budget instead (engine/speculation.py).
TOKENS_PER_PASS = 3.0


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """The scheduling part of EngineConfig (checked there)."""

    max_waiting: int = ENGINE_DEFAULTS.max_queued  # accepted requests waiting for a slot
    token_budget: int = ENGINE_DEFAULTS.token_budget  # tokens per step: one per decoding sequence, the rest prompt
    prefill_chunk: int = ENGINE_DEFAULTS.prefill_chunk  # most prompt tokens of one sequence in one step
    itl_target_ms: float | None = None  # a decoding step's time target; prompt work beside it is sized to fit
    speculation_policy: str = "auto"  # auto: a request that asks speculates when it pays at its claim; always

    @classmethod
    def from_config(cls, config: EngineConfig) -> SchedulerLimits:
        return cls(config.max_queued, config.token_budget, config.prefill_chunk, config.itl_target_ms)


class QueueFull(Exception):
    def __init__(self, waiting: int) -> None:
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting = waiting


# ---- the plan ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotClaim:
    seq: Sequence
    slot: int
    keep: int  # leading prompt tokens the slot already holds: reused in place
    move_to: int | None = None  # first move the slot's other contents to this free row
    speculate: bool = False  # the sequence verifies proposals from its own context for its whole life


@dataclass(frozen=True, slots=True)
class PrefixCopy:
    seq: Sequence
    slot: int  # the sequence's row, which holds the prompt up to `start`
    source: int  # the row that holds it further
    start: int
    upto: int  # the row holds the prompt up to here after the copy


@dataclass(frozen=True, slots=True)
class PromptChunk:
    seq: Sequence
    slot: int
    start: int  # first prompt position it runs
    tokens: int

    @property
    def ids(self) -> tuple[int, ...]:
        return self.seq.request.prompt_ids[self.start : self.start + self.tokens]

    @property
    def ends_prompt(self) -> bool:
        """Its last token's logits give the sequence's first output token."""
        return self.start + self.tokens == self.seq.prompt_len


@dataclass(frozen=True, slots=True)
class PromptPass:
    """One forward pass over prompt chunks: one chunk on top of its row's past, or several that start empty rows."""

    chunks: tuple[PromptChunk, ...]

    @property
    def computed_tokens(self) -> int:
        """What the pass computes, padding included (rows are right-padded to the longest)."""
        return len(self.chunks) * max(c.tokens for c in self.chunks)


@dataclass(frozen=True, slots=True)
class DecodeRow:
    seq: Sequence
    slot: int
    token: int  # the last sampled token, fed at the row's next position


@dataclass(frozen=True, slots=True)
class VerifyPass:
    """A speculative row's pass over its own slot: its last sampled token, then the proposals (engine/speculation.py)."""

    seq: Sequence
    slot: int
    tokens: tuple[int, ...]

    @property
    def draft(self) -> tuple[int, ...]:
        return self.tokens[1:]


@dataclass(frozen=True, slots=True)
class StepPlan:
    claims: tuple[SlotClaim, ...] = ()
    copies: tuple[PrefixCopy, ...] = ()
    passes: tuple[PromptPass, ...] = ()
    decode: tuple[DecodeRow, ...] = ()
    verify: tuple[VerifyPass, ...] = ()

    def chunks(self) -> Iterator[PromptChunk]:
        for p in self.passes:
            yield from p.chunks

    def sampled(self) -> list[Sequence]:
        """The sequences sampled together this step, in the order their logits come: those whose prompt a pass
        finishes, pass by pass, then the decode rows (verification passes choose their tokens on their own)."""
        return [c.seq for c in self.chunks() if c.ends_prompt] + [r.seq for r in self.decode]

    @property
    def sequences(self) -> int:
        """Sequences that run something this step."""
        return sum(len(p.chunks) for p in self.passes) + len(self.decode) + len(self.verify)


# ---- the scheduler --------------------------------------------------------------------------------------------


class Scheduler:
    """The queue (waiting, then running in admission order) and the policy that plans each step over it.

    reuse: the prefix cache is on and the runner keeps rows. prompt_pass_tokens: most tokens (rows x longest,
    padding included) of a pass shared by prompts that start empty rows; 0: every prompt runs alone."""

    def __init__(self, limits: SchedulerLimits, reuse: bool = False, prompt_pass_tokens: int = 0,
                 speculation: bool = False) -> None:
        self.limits = limits
        self.reuse = reuse
        self.prompt_pass_tokens = prompt_pass_tokens
        self.speculation = speculation  # the runner has verification passes (GQA slots)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # PREFILLING or DECODING, in admission order

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.limits.max_waiting:
            raise QueueFull(len(self.waiting))
        self.waiting.append(seq)

    def start(self, seq: Sequence) -> None:
        """A planned claim was made: the sequence leaves the head of the queue for the running batch."""
        if not self.waiting or self.waiting[0] is not seq:
            raise ValueError("sequences start in the order they wait")
        self.running.append(self.waiting.popleft())

    def remove(self, seq: Sequence) -> None:
        """A finished sequence leaves at once; its slot is the caller's to release."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    # ---- planning: reads the queue, the table and the costs; changes nothing --------------------------------

    def schedule(self, table: SlotTable, costs: StepCosts) -> StepPlan:
        decoding = [s for s in self.running if s.status == SeqStatus.DECODING]
        admitted = self._admissible(table.free_count, len(decoding))
        prefilling = [s for s in self.running if s.status == SeqStatus.PREFILLING] + admitted
        # Prompts that would start an empty row: each of them shares a pass with the others, if there are others.
        fresh = sum(1 for s in prefilling if s.prefilled == 0)
        shares = self.prompt_pass_tokens > 0 and fresh > 1
        # Where each prefilling sequence's row stands: its slot, and how much of its prompt the row holds.
        slots = {s: s.slot for s in prefilling}
        starts = {s: s.prefilled for s in prefilling}
        trial = table.copy() if admitted or (self.reuse and prefilling) else table  # claims and copies are tried on a copy

        claims = []
        # The rows a new sequence will decode beside: every running sequence and every waiting one (this step's
        # claims among them), not only those claimed before it, or the first of a burst would speculate alone;
        # and as many as lately decoded together, since a sequence that starts alone between the requests of
        # busy clients soon has them beside it again (its decision holds for its whole life).
        load = max(len(self.running) + len(self.waiting), costs.rows.value)
        for seq in admitted:
            claim = self._claim(trial, seq, costs, shares, load)
            claims.append(claim)
            slots[seq], starts[seq] = claim.slot, claim.keep
        copies = []
        for seq in prefilling if self.reuse else ():
            start = starts[seq]
            source, upto = best_source(trial, seq.prompt_array, seq.namespace, exclude=slots[seq])
            if source is not None and reuse_pays(costs, upto - start, copied=True, shares=shares and start == 0):
                trial.append(slots[seq], trial.tokens[source, start:upto].copy())
                copies.append(PrefixCopy(seq, slots[seq], source, start, upto))
                starts[seq] = upto
        rows, verify = self._decoding(decoding, table)
        chunks = self._chunks(prefilling, slots, starts, rows, verify, costs, shares)
        return StepPlan(tuple(claims), tuple(copies), self._passes(chunks, costs), rows, verify)

    def _decoding(self, decoding: list[Sequence], table: SlotTable
                  ) -> tuple[tuple[DecodeRow, ...], tuple[VerifyPass, ...]]:
        """Each decoding sequence's entry: a verification pass where a speculative one's context offers
        proposals (as many as its output, its slot and one pass have room for), else a decode row."""
        rows, verify = [], []
        for s in decoding:
            room = min(s.max_tokens - len(s.output_ids), table.room(s.slot), self.prompt_pass_tokens or 1) - 1
            proposals = []
            if s.speculative and s.drafting.allowed:
                proposals = propose(s.context(), s.request.params.speculation, min(room, s.drafting.allowed))
            if proposals:
                verify.append(VerifyPass(s, s.slot, (s.output_ids[-1], *proposals)))
            else:
                rows.append(DecodeRow(s, s.slot, s.output_ids[-1]))
        return tuple(rows), tuple(verify)

    def _admissible(self, free_slots: int, decoding: int) -> list[Sequence]:
        """Waiting sequences that take a slot now, in arrival order. None while decoding takes the whole token
        budget: a slot taken now would sit idle."""
        if self.limits.token_budget <= decoding:
            return []
        return list(self.waiting)[:free_slots]

    def _claim(self, trial: SlotTable, seq: Sequence, costs: StepCosts, shares: bool, rows: float) -> SlotClaim:
        """The slot a new sequence takes, tried on the trial table so the next claim of this step sees it; and
        whether it speculates, with `rows` decoding once it does."""
        choice = choose_slot(trial, seq.prompt_array, seq.namespace, seq.max_tokens, costs, self.reuse,
                             keep_pays=lambda n: reuse_pays(costs, n, copied=False, shares=shares))
        if choice.move_to is not None:
            move_row(trial, choice.slot, choice.move_to,
                     lambda src, dst, end: trial.append(dst, trial.tokens[src, :end].copy()))
        trial.claim(choice.slot, seq.namespace, keep=choice.keep)
        return SlotClaim(seq, choice.slot, choice.keep, choice.move_to, self._speculates(seq, costs, rows))

    def _speculates(self, seq: Sequence, costs: StepCosts, rows: float) -> bool:
        """Whether a sequence that asks for speculation gets it: a verification pass of max_draft proposals
        must be expected to give more tokens per millisecond than the sequence's share of a decode step of
        `rows` rows, a pass giving TOKENS_PER_PASS. Decided once, for the sequence's whole life, so its tokens
        do not depend on who shares its steps later (engine/speculation.py)."""
        spec = seq.request.params.speculation
        if not (self.speculation and spec is not None and spec.on):
            return False
        if self.limits.speculation_policy == "always":
            return True
        share_ms = costs.decode(rows) / rows
        return TOKENS_PER_PASS * share_ms >= costs.prefill(spec.max_draft + 1)

    def _chunks(self, prefilling: list[Sequence], slots: dict[Sequence, int], starts: dict[Sequence, int],
                decode: tuple[DecodeRow, ...], verify: tuple[VerifyPass, ...], costs: StepCosts,
                shares: bool) -> list[PromptChunk]:
        """This step's prompt chunks, in admission order, within the token budget and the latency target."""
        budget = self.limits.token_budget - len(decode) - sum(len(v.tokens) for v in verify)
        spare_ms = self._prompt_time(decode, verify, costs)
        chunks: list[PromptChunk] = []
        for seq in prefilling:
            if budget <= 0:
                break
            start = starts[seq]
            if self.reuse and _computed_by_another(seq, start, chunks, costs, shares):
                continue
            limit = min(self.limits.prefill_chunk, budget)
            if spare_ms is not None:
                # Each chunk is a forward pass of its own, which pays the pass's fixed cost (reading every
                # weight) before its tokens: a second chunk runs only if it fits whole.
                fits = costs.prompt_tokens_within(spare_ms)
                if chunks and fits < MIN_PREFILL_PASS:
                    break
                limit = min(limit, max(MIN_PREFILL_PASS, fits))
            n = chunk_size(seq.prompt_len - start, limit)
            chunks.append(PromptChunk(seq, slots[seq], start, n))
            budget -= n
            if spare_ms is not None:
                spare_ms -= costs.prefill(n)
        return chunks

    def _prompt_time(self, decode: tuple[DecodeRow, ...], verify: tuple[VerifyPass, ...],
                     costs: StepCosts) -> float | None:
        """With a latency target and rows decoding: the milliseconds this step has for prompt passes."""
        target = self.limits.itl_target_ms
        if not (decode or verify) or not target:
            return None
        # A decode step runs every row up to the highest; each verification pass is a pass of its own.
        decode_ms = (costs.decode(max(r.slot for r in decode) + 1) if decode else 0.0) + sum(
            costs.prefill(len(v.tokens)) for v in verify)
        return max(target - decode_ms, PROMPT_FLOOR_SHARE * decode_ms)

    def _passes(self, chunks: list[PromptChunk], costs: StepCosts) -> tuple[PromptPass, ...]:
        """The chunks as forward passes, in chunk order: those that start an empty row may share one."""
        fresh = [i for i, c in enumerate(chunks) if self.prompt_pass_tokens and c.start == 0]
        groups = shared_passes([chunks[i].tokens for i in fresh], self.prompt_pass_tokens,
                               costs.prefill.intercept, costs.prefill.slope)
        head = {fresh[g[0]]: g for g in groups}
        grouped = {fresh[j] for g in groups for j in g}
        return tuple(PromptPass(tuple(chunks[fresh[j]] for j in head[i])) if i in head else PromptPass((c,))
                     for i, c in enumerate(chunks) if i in head or i not in grouped)


def reuse_pays(costs: StepCosts, n: int, copied: bool, shares: bool) -> bool:
    """The reuse rule: whether taking n prompt tokens from the prefix cache (copied from another row, or kept
    in place) beats computing them. shares: the row would otherwise start empty beside other new prompts and
    share their pass; with the reuse it has a past and runs alone, so the saving must also beat a pass's
    fixed cost."""
    if n <= 0:
        return False
    if not shares:
        return not copied or costs.copy(n) < costs.prefill(n)
    return costs.prefill.slope * n > (costs.copy(n) if copied else 0.0) + costs.prefill.intercept


def _computed_by_another(seq: Sequence, start: int, planned: list[PromptChunk], costs: StepCosts,
                         shares: bool) -> bool:
    """Whether a chunk already planned this step computes seq's next prompt tokens, enough of them to be worth
    a step's wait and a copy: the same tokens at the same positions, from a cache no further along."""
    for chunk in planned:
        other = chunk.seq
        if other.namespace != seq.namespace or not chunk.start <= start < chunk.start + chunk.tokens:
            continue
        shared = min(common_prefix(other.prompt_array, seq.prompt_array), chunk.start + chunk.tokens) - start
        if reuse_pays(costs, shared, copied=True, shares=shares and start == 0):
            return True
    return False


def shared_passes(lengths: list[int], capacity: int, fixed_ms: float, per_token_ms: float) -> list[list[int]]:
    """Group chunks that start empty rows (their indices into `lengths`) into passes; a group of one runs alone.

    Every forward pass reads all the weights before its first token, a fixed cost that a short prompt pays
    again and again when each runs alone. Rows of a shared pass are right-padded to its longest chunk, and
    padding costs compute: a chunk joins a pass when its padding costs no more than the pass of its own it
    saves, and the pass stays within `capacity` (rows x longest). Longest first, so each pass is as long as
    its first chunk. A chunk shorter than MIN_PREFILL_PASS always runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    passes: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if passes and n >= MIN_PREFILL_PASS:
            group = passes[-1]
            width = lengths[group[0]]
            # Longest first: the group's head is at least n long, so at least MIN_PREFILL_PASS too.
            if (len(group) + 1) * width <= capacity and (width - n) * per_token_ms <= fixed_ms:
                group.append(i)
                continue
        passes.append([i])
    return passes
