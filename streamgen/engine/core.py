"""The step loop, single-threaded. A step is three moves:

    plan = scheduler.schedule(table, costs)   who runs, where, and how (engine/scheduler.py)
    out = executor.execute(plan)              KV claims and copies, forward passes, sampling (engine/executor.py)
    events = self._update(plan, out)          sequences move on; tokens and final events come out

EngineCore owns the queue (the scheduler), the runner's KV slots and the step
costs. The threaded Engine and the offline `generate()` both drive it.
`_update` and `_finish` are the only code that moves a sequence's status.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from streamgen.engine.costs import StepCosts
from streamgen.engine.executor import KVRunner, Sampled, StepExecutor, StepOutput
from streamgen.engine.observer import NULL_OBSERVER, RequestObserver
from streamgen.engine.request import ErrorEvent, Event, FinishEvent, GenerationRequest
from streamgen.engine.scheduler import Scheduler, SchedulerLimits, StepPlan
from streamgen.engine.sequence import INTERNAL_ERROR, Sequence, SeqStatus
from streamgen.engine.tokenizer import TextTokenizer

__all__ = ["EngineCore", "KVRunner"]

log = structlog.get_logger("streamgen.engine")


class EngineCore:
    def __init__(
        self,
        runner: KVRunner,
        tokenizer: TextTokenizer,
        limits: SchedulerLimits,
        on_decode: Callable[[int], None] | None = None,
        prefix_cache: bool = True,
        costs: StepCosts | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.reuse = prefix_cache and runner.supports_reuse  # rows keep their KV after their request
        self.scheduler = Scheduler(limits, self.reuse, runner.prompt_pass_tokens,
                                   getattr(runner, "supports_speculation", False))
        self.costs = costs or StepCosts()
        self._on_decode = on_decode  # told each decode step's batch size
        self.busy_s = 0.0  # time spent in steps (the rest of the wall time the machine was idle)
        self.on_step: Callable[[float, int], None] | None = None  # told each step's seconds and sequences
        self.on_masks: Callable[[float], None] | None = None  # told the seconds a step's grammar masks took
        self.on_verify: Callable[[int, int], None] | None = None  # told each verification pass's proposals and kept

    @property
    def costs(self) -> StepCosts:
        return self.executor.costs

    @costs.setter
    def costs(self, costs: StepCosts) -> None:
        self.executor = StepExecutor(self.runner, costs)  # what the executor measures, the scheduler plans with

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add(self, request: GenerationRequest, key: int, observer: RequestObserver = NULL_OBSERVER) -> Sequence:
        """Queue a validated request (raises QueueFull when the waiting queue is full)."""
        seq = Sequence(key, request, self.tokenizer, self.runner.info.context_length, observer)
        self.scheduler.add(seq)
        return seq

    def cancel(self, seq: Sequence) -> list[Event]:
        """End a sequence now: it leaves the batch and its slot is free for the next step."""
        return [self._finish(seq, SeqStatus.FINISHED_CANCELLED)] if seq.running else []

    def fail(self, seq: Sequence, code: str, message: str) -> list[Event]:
        """End a sequence with an error a client may see (e.g. shutting_down); its slot is freed."""
        return [self._finish(seq, SeqStatus.FINISHED_ERROR, error=(code, message))] if seq.running else []

    def step(self) -> list[Event]:
        plan = self.scheduler.schedule(self.runner.table, self.costs)
        out = self.executor.execute(plan)
        return self._update(plan, out)

    # ---- update: the plan's outcome, applied to the sequences ----------------------------------------------

    def _update(self, plan: StepPlan, out: StepOutput) -> list[Event]:
        for claim in plan.claims:
            self.scheduler.start(claim.seq)
            claim.seq.admitted(claim.slot, out.started, cached=claim.keep)
            claim.seq.speculative = claim.speculate
        for copy in plan.copies:
            copy.seq.reused(copy.upto)
        for p, (start, end) in zip(plan.passes, out.passes):
            for chunk in p.chunks:
                chunk.seq.prompt_ran(chunk.tokens, end - start)
                chunk.seq.observer.prefill(start, end, len(p.chunks), chunk.tokens, chunk.seq.cached_tokens)
        if out.decode is not None:
            start, end = out.decode
            for row in plan.decode:
                row.seq.observer.forward(len(row.seq.output_ids), start, end, len(plan.decode))
                if row.seq.speculative:
                    row.seq.drafting.decoded()
            if self._on_decode is not None:
                self._on_decode(len(plan.decode))
        for v, (start, end, kept) in zip(plan.verify, out.verify):
            v.seq.observer.forward(len(v.seq.output_ids), start, end, 1)
            v.seq.proposed += len(v.draft)
            v.seq.accepted += kept
            v.seq.drafting.verified(len(v.draft), kept)
            if self.on_verify is not None:
                self.on_verify(len(v.draft), kept)
        self._charge(plan, out.ended - out.started)
        if out.mask_s is not None and self.on_masks is not None:
            self.on_masks(out.mask_s)
        events: list[Event] = [self._finish(seq, SeqStatus.FINISHED_ERROR) for seq in out.failed]
        start, end = out.sampling or (out.ended, out.ended)
        for sampled in out.sampled:
            if not sampled.seq.running:
                continue  # a token after a verification pass's stop: never streamed
            sampled.seq.observer.sample(len(sampled.seq.output_ids), start, end, len(out.sampled))
            try:
                events += self._accept(sampled, end)
            except Exception:  # noqa: BLE001 - e.g. detokenization: this request fails, the batch goes on
                log.exception("request.row_failed", request_id=sampled.seq.request.request_id,
                              key=sampled.seq.key)
                events.append(self._finish(sampled.seq, SeqStatus.FINISHED_ERROR))
        return events

    def _accept(self, sampled: Sampled, now: float) -> list[Event]:
        """A sampled token: a stop token ends the sequence unseen; any other is streamed, and then a stop string
        or the length may end it."""
        seq = sampled.seq
        if sampled.token_id in seq.request.stop_token_ids:
            return [self._finish(seq, SeqStatus.FINISHED_STOPPED, now)]
        event, stopped = seq.append(sampled.token_id, sampled.logprob, sampled.top_logprobs)
        if stopped:  # the stop string's text was held back, and stays unsent
            return [event, self._finish(seq, SeqStatus.FINISHED_STOPPED, flush=False)]
        if seq.at_length:
            return [event, self._finish(seq, SeqStatus.FINISHED_LENGTH)]
        return [event]

    def _finish(self, seq: Sequence, status: SeqStatus, now: float | None = None, flush: bool = True,
                error: tuple[str, str] = INTERNAL_ERROR) -> FinishEvent | ErrorEvent:
        """Every way a sequence ends: its final event, and it leaves the batch. With the prefix cache on, its
        slot keeps what it holds for the requests after it."""
        event = seq.finish(status, time.perf_counter() if now is None else now, flush, error)
        self.scheduler.remove(seq)
        if seq.slot is not None:
            self.runner.table.release(seq.slot, keep_contents=self.reuse)
            seq.slot = None
        return event

    def _charge(self, plan: StepPlan, seconds: float) -> None:
        """Split the step's time among the sequences in it, in proportion to the tokens each ran (a prompt
        chunk, or one decoded token): what each request cost of the machine. Idle time is charged to no one."""
        work = ([(c.seq, c.tokens) for c in plan.chunks()] + [(r.seq, 1) for r in plan.decode]
                + [(v.seq, len(v.tokens)) for v in plan.verify])
        tokens = sum(n for _, n in work)
        for seq, n in work:
            seq.compute_s += seconds * n / tokens
        self.busy_s += seconds
        if self.on_step is not None:
            self.on_step(seconds, plan.sequences)
