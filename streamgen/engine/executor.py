"""Run a step's plan on the runner: slot claims and moves, prefix copies, prompt passes, one decode pass,
speculative verification passes, then sampling.

It does what the plan says, in the plan's order, and times it: the times
feed the step costs the scheduler plans with (engine/costs.py) and come back
in a StepOutput for the core's update, which alone changes the sequences.
The only sequence state read here is what sampling needs (each row's
sampler); everything else comes from the plan.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import structlog

from streamgen.engine.costs import StepCosts
from streamgen.engine.grammar import MaskFiller, allowed_tokens
from streamgen.engine.sampling import sample
from streamgen.engine.scheduler import PromptPass, StepPlan, VerifyPass
from streamgen.engine.speculation import verify
from streamgen.engine.sequence import Sequence
from streamgen.engine.slot_table import SlotTable, move_row
from streamgen.model_files import ModelInfo

log = structlog.get_logger("streamgen.engine")


class KVRunner(Protocol):
    """What a step needs from a runner: KV slots recorded in a table, prefill into one, decode several,
    copy a prefix between two."""

    info: ModelInfo
    max_slots: int
    table: SlotTable  # the slot contract: what each row holds; the runner writes it as it runs
    supports_reuse: bool  # rows can be kept and copied (prefix caching)
    supports_speculation: bool  # verify() runs several tokens on top of one row's past
    prompt_pass_tokens: int  # most tokens (rows x longest prompt) prefill_fresh takes in one pass; 0: none

    def prefill(self, slot: int, token_ids: Seq[int]) -> np.ndarray: ...  # [V]
    def prefill_fresh(self, slots: Seq[int], prompts: Seq[Seq[int]]) -> np.ndarray: ...  # [len(slots), V]
    def decode(self, slots: Seq[int], token_ids: Seq[int]) -> np.ndarray: ...  # [len(slots), V]
    def copy_prefix(self, src: int, dst: int, end: int) -> None: ...
    def verify(self, slot: int, token_ids: Seq[int]) -> np.ndarray: ...  # [len(token_ids), V]


@dataclass(frozen=True, slots=True)
class Sampled:
    """One token for one sequence (a verification pass gives a sequence several, in order)."""

    seq: Sequence
    token_id: int
    logprob: float | None  # only where the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] | None


@dataclass(slots=True)
class StepOutput:
    started: float  # perf_counter() when the step began
    passes: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each of the plan's passes
    decode: tuple[float, float] | None = None
    verify: list[tuple[float, float, int]] = field(default_factory=list)  # per verification pass: start, end, kept
    sampling: tuple[float, float] | None = None
    sampled: list[Sampled] = field(default_factory=list)  # rows that got a token, in the order they ran
    failed: list[Sequence] = field(default_factory=list)  # rows whose sampling raised: they alone fail
    mask_s: float | None = None  # filling the constrained rows' masks (beside the forward pass); None: none
    ended: float = 0.0


class StepExecutor:
    def __init__(self, runner: KVRunner, costs: StepCosts) -> None:
        self.runner = runner
        self.costs = costs
        self._masks: MaskFiller | None = None  # made on the first constrained step

    def execute(self, plan: StepPlan) -> StepOutput:
        out = StepOutput(time.perf_counter())
        masks = self._start_masks(plan.sampled())
        self._place(plan)
        ready: list[Sequence] = []
        rows: list[np.ndarray] = []
        for p in plan.passes:
            start = time.perf_counter()
            logits = self._prompt_pass(p)
            end = time.perf_counter()
            self.costs.prefill.observe(p.computed_tokens, (end - start) * 1000)
            out.passes.append((start, end))
            for chunk, row in zip(p.chunks, logits):
                if chunk.ends_prompt:
                    ready.append(chunk.seq)
                    rows.append(row[None, :])
        if plan.decode:
            slots = [r.slot for r in plan.decode]
            start = time.perf_counter()
            rows.append(self.runner.decode(slots, [r.token for r in plan.decode]))
            end = time.perf_counter()
            self.costs.decode.observe(max(slots) + 1, (end - start) * 1000)
            out.decode = (start, end)
            ready += [r.seq for r in plan.decode]
        allowed = None
        if masks is not None:
            bitmask = masks.wait()
            out.mask_s = masks.seconds
            allowed = [allowed_tokens(bitmask[i], self.runner.info.vocab_size) if s.matcher is not None else None
                       for i, s in enumerate(ready)]
        if ready:
            start = time.perf_counter()
            self._sample(ready, np.concatenate(rows), allowed, out)
            out.sampling = (start, time.perf_counter())
        for v in plan.verify:
            self._verify(v, out)
        if plan.decode or plan.verify:
            self.costs.rows.observe(len(plan.decode) + len(plan.verify))
        out.ended = time.perf_counter()
        return out

    def _verify(self, v: VerifyPass, out: StepOutput) -> None:
        """A speculative row's pass: the tokens it keeps (engine/speculation.py), the rejected proposals' K/V
        given back."""
        past = int(self.runner.table.lengths[v.slot])
        start = time.perf_counter()
        logits = self.runner.verify(v.slot, v.tokens)
        end = time.perf_counter()
        self.costs.prefill.observe(len(v.tokens), (end - start) * 1000)
        try:
            result = verify(logits, v.draft, v.seq.sampler)
        except Exception:  # noqa: BLE001 - this row fails alone
            log.exception("request.row_failed", request_id=v.seq.request.request_id, key=v.seq.key)
            out.failed.append(v.seq)
            return
        self.runner.table.truncate(v.slot, past + result.accepted + 1)
        out.verify.append((start, end, result.accepted))
        out.sampled += [Sampled(v.seq, t, lp, top) for t, lp, top in zip(result.tokens, result.logprobs,
                                                                          result.top_logprobs)]

    def _start_masks(self, sampled: list[Sequence]) -> MaskFiller | None:
        """Begin filling the masks of the rows that will be sampled under a constraint; None when there are none
        (unconstrained steps pay nothing)."""
        constrained = [(s.matcher, i) for i, s in enumerate(sampled) if s.matcher is not None]
        if not constrained:
            return None
        if self._masks is None:
            self._masks = MaskFiller()
        self._masks.start(constrained, len(sampled), self.runner.info.vocab_size)
        return self._masks

    def _place(self, plan: StepPlan) -> None:
        """Claims (after any move they need), then prefix copies, each timed into the copy cost."""
        table = self.runner.table
        for claim in plan.claims:
            if claim.move_to is not None:
                move_row(table, claim.slot, claim.move_to, self._copy)
            table.claim(claim.slot, claim.seq.namespace, keep=claim.keep)
        for copy in plan.copies:
            self._copy(copy.source, copy.slot, copy.upto)

    def _copy(self, src: int, dst: int, end: int) -> None:
        n = end - int(self.runner.table.lengths[dst])
        start = time.perf_counter()
        self.runner.copy_prefix(src, dst, end)
        self.costs.copy.observe(n, (time.perf_counter() - start) * 1000)

    def _prompt_pass(self, p: PromptPass) -> np.ndarray:
        """Each chunk's last-token logits [len(chunks), V]: one chunk alone over its row's past, or several
        that start empty rows in one pass (GroupQueryAttention batches prompts only without a past)."""
        if len(p.chunks) == 1:
            chunk = p.chunks[0]
            return self.runner.prefill(chunk.slot, chunk.ids)[None, :]
        return self.runner.prefill_fresh([c.slot for c in p.chunks], [c.ids for c in p.chunks])

    def _sample(self, ready: list[Sequence], logits: np.ndarray, allowed: list[np.ndarray | None] | None,
                out: StepOutput) -> None:
        """One batched draw; if it raises, each row alone, so only the rows at fault fail."""
        try:
            picked = sample(logits, [s.sampler for s in ready], allowed)
        except Exception:  # noqa: BLE001 - find the row at fault, fail it alone, keep the others
            keep = []
            for i, seq in enumerate(ready):
                try:
                    sample(logits[i : i + 1], [seq.sampler], None if allowed is None else [allowed[i]])
                    keep.append(i)
                except Exception:  # noqa: BLE001
                    log.exception("request.row_failed", request_id=seq.request.request_id, key=seq.key)
                    out.failed.append(seq)
            ready, logits = [ready[i] for i in keep], logits[keep]
            allowed = None if allowed is None else [allowed[i] for i in keep]
            picked = sample(logits, [s.sampler for s in ready], allowed)
        for seq, token_id, logprob, top in zip(ready, picked.token_ids, picked.logprobs, picked.top_logprobs):
            wanted = seq.request.params.logprobs
            out.sampled.append(Sampled(seq, int(token_id), float(logprob) if wanted else None, top))
