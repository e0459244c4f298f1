"""The step loop, single-threaded: admit, schedule, run the batch, sample, detokenize, update.

EngineCore owns the runner's KV slots and the scheduler. `step()` does one
round and returns the events it produced; the threaded Engine and the
offline `generate()` both drive it. With the prefix cache on, a request
takes the slot engine/prefix.py chooses, keeps what that slot already holds
of its prompt, and copies from any other slot what that one holds beyond
it; only the rest is prefilled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import replace
from typing import Protocol

import numpy as np
import structlog

from streamgen.engine.costs import StepCosts
from streamgen.engine.observer import NULL_OBSERVER, RequestObserver
from streamgen.engine.prefix import best_source, choose_slot
from streamgen.engine.prompt_passes import shared_passes
from streamgen.engine.request import Event, FinishReason, GenerationRequest
from streamgen.model_files import ModelInfo
from streamgen.engine.sampling import sample
from streamgen.engine.scheduler import Scheduler, SchedulerLimits, StepPlan
from streamgen.engine.sequence import Sequence, SeqStatus
from streamgen.engine.slot_table import SlotTable
from streamgen.engine.tokenizer import TextTokenizer


log = structlog.get_logger("streamgen.engine")


class KVRunner(Protocol):
    """What the loop needs from a runner: KV slots recorded in a table, prefill into one, decode several,
    copy a prefix between two."""

    info: ModelInfo
    max_slots: int
    table: SlotTable  # the slot contract: what each row holds; the runner writes it as it runs
    supports_reuse: bool  # rows can be kept and copied (prefix caching)
    prompt_pass_tokens: int  # most tokens (rows x longest prompt) prefill_fresh takes in one pass; 0: none

    def prefill(self, slot: int, token_ids: Seq[int]) -> np.ndarray: ...  # [V]
    def prefill_fresh(self, slots: Seq[int], prompts: Seq[Seq[int]]) -> np.ndarray: ...  # [len(slots), V]
    def decode(self, slots: Seq[int], token_ids: Seq[int]) -> np.ndarray: ...  # [len(slots), V]
    def copy_prefix(self, src: int, dst: int, end: int) -> None: ...


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
        self.reuse = prefix_cache and runner.supports_reuse
        if limits.share_prefixes and not self.reuse:
            limits = replace(limits, share_prefixes=False)  # a deferred prompt could never copy what it waited for
        self.scheduler = Scheduler(limits)
        self.costs = costs or StepCosts()
        self._on_decode = on_decode  # told each decode step's batch size
        self.busy_s = 0.0  # time spent in steps (the rest of the wall time the machine was idle)
        self.on_step: Callable[[float, int], None] | None = None  # told each step's seconds and sequences

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
        if not seq.running:
            return []
        event = seq.finish(FinishReason.CANCELLED, time.perf_counter())
        self._release(seq)
        return [event]

    def fail(self, seq: Sequence, code: str, message: str) -> list[Event]:
        """End a sequence with an error (e.g. shutting_down); its slot is freed."""
        if not seq.running:
            return []
        event = seq.fail(time.perf_counter(), code, message)
        self._release(seq)
        return [event]

    def step(self) -> list[Event]:
        started = time.perf_counter()
        self._admit(self.scheduler.admit(self.runner.table.free_count))
        self._catch_up()
        plan = self.scheduler.plan(self.costs)
        ready, logits = self._run(plan)
        if not ready:
            self._charge(plan, time.perf_counter() - started)
            return []
        sample_start = time.perf_counter()
        events: list[Event] = []
        try:
            picked = sample(logits, [s.sampler for s in ready])
        except Exception:  # noqa: BLE001 - find the row at fault, fail it alone, keep the others
            ready, logits, failed = self._sample_rows_apart(ready, logits)
            events += failed
            picked = sample(logits, [s.sampler for s in ready])
        sampled = time.perf_counter()
        self._charge(plan, sampled - started)
        for seq, token_id, logprob, top in zip(ready, picked.token_ids, picked.logprobs, picked.top_logprobs):
            try:
                seq.observer.sample(len(seq.output_ids), sample_start, sampled, len(ready))
                events += seq.accept(int(token_id), float(logprob) if seq.request.params.logprobs else None, sampled,
                                     top)
            except Exception:  # noqa: BLE001 - e.g. detokenization: this request fails, the batch goes on
                events.append(self._fail(seq))
            if not seq.running:
                self._release(seq)
        return events

    def _charge(self, plan: StepPlan, seconds: float) -> None:
        """Split the step's time among the sequences in it, in proportion to the tokens each ran (a prompt
        chunk, or one decoded token): what each request cost of the machine. Idle time is charged to no one."""
        work = [(seq, n) for seq, n in plan.prefill] + [(seq, 1) for seq in plan.decode]
        tokens = sum(n for _, n in work)
        for seq, n in work:
            seq.compute_s += seconds * n / tokens
        self.busy_s += seconds
        if self.on_step is not None:
            self.on_step(seconds, len(plan.decode) + len(plan.prefill))

    def _sample_rows_apart(self, ready: list[Sequence], logits: np.ndarray):
        """Sample each row alone to find the ones that raise; fail those."""
        keep, failed = [], []
        for i, seq in enumerate(ready):
            try:
                sample(logits[i : i + 1], [seq.sampler])
                keep.append(i)
            except Exception:  # noqa: BLE001
                failed.append(self._fail(seq))
                self._release(seq)
        return [ready[i] for i in keep], logits[keep], failed

    def _fail(self, seq: Sequence) -> Event:
        log.exception("request.row_failed", request_id=seq.request.request_id, key=seq.key)
        return seq.fail(time.perf_counter())

    def _admit(self, seqs: list[Sequence]) -> None:
        """Give each admitted sequence its slot, keeping whatever prefix of its prompt the slot holds."""
        table = self.runner.table
        now = time.perf_counter()
        share = self._new_prompts(admitting=len(seqs)) > 1
        for seq in seqs:
            choice = choose_slot(table, seq.prompt_array, seq.namespace, seq.max_tokens, self.costs, self.reuse,
                                 share_pass=share)
            if choice.move_to is not None:
                self._move(choice.slot, choice.move_to)
            table.claim(choice.slot, seq.namespace, keep=choice.keep)
            seq.admitted(choice.slot, now, cached=choice.keep)

    def _move(self, src: int, dst: int) -> None:
        """Move a free row's contents to another free row (it keeps its age), so src can be taken."""
        table = self.runner.table
        held, age = int(table.lengths[src]), int(table.last_used[src])
        table.claim(dst, table.namespace[src])
        start = time.perf_counter()
        self.runner.copy_prefix(src, dst, held)
        self.costs.copy.observe(held, (time.perf_counter() - start) * 1000)
        table.release(dst)
        table.last_used[dst] = age

    def _catch_up(self) -> None:
        """A prefilling sequence copies the part of its prompt that another row already holds beyond its own."""
        if not self.reuse:
            return
        table = self.runner.table
        share = self._new_prompts() > 1
        for seq in self.scheduler.running:
            if seq.status != SeqStatus.PREFILLING:
                continue
            source, upto = best_source(table, seq.prompt_array, seq.namespace, exclude=seq.slot)
            n = upto - seq.prefilled
            if source is None or not self.costs.reuse_pays(n, share_pass=share and seq.prefilled == 0):
                continue
            start = time.perf_counter()
            self.runner.copy_prefix(source, seq.slot, upto)
            self.costs.copy.observe(n, (time.perf_counter() - start) * 1000)
            seq.reused(upto)

    def _run(self, plan: StepPlan) -> tuple[list[Sequence], np.ndarray]:
        """The prompt chunks, in as few passes as pay (engine/prompt_passes.py), then one decode pass for
        every decoding row. Returns the sequences that get a token this step and their logits [N, V]."""
        ready: list[Sequence] = []
        rows: list[np.ndarray] = []
        for chunks in self._prompt_passes(plan):
            start = time.perf_counter()
            ids = [seq.request.prompt_ids[seq.prefilled : seq.prefilled + n] for seq, n in chunks]
            if len(chunks) == 1:
                pass_logits = self.runner.prefill(chunks[0][0].slot, ids[0])[None, :]
                tokens = chunks[0][1]
            else:
                pass_logits = self.runner.prefill_fresh([seq.slot for seq, _ in chunks], ids)
                tokens = len(chunks) * max(n for _, n in chunks)  # padded: what the pass computed
            end = time.perf_counter()
            self.costs.prefill.observe(tokens, (end - start) * 1000)
            for (seq, n), row_logits in zip(chunks, pass_logits):
                seq.prefilled += n
                seq.prefill_s += end - start
                seq.observer.prefill(start, end, len(chunks), n, seq.cached_tokens)
                if seq.remaining_prompt == 0:
                    seq.status = SeqStatus.DECODING
                    ready.append(seq)
                    rows.append(row_logits[None, :])
        if plan.decode:
            slots = [s.slot for s in plan.decode]
            start = time.perf_counter()
            decode_logits = self.runner.decode(slots, [s.output_ids[-1] for s in plan.decode])
            end = time.perf_counter()
            self.costs.decode.observe(max(slots) + 1, (end - start) * 1000)
            for seq in plan.decode:
                seq.observer.forward(len(seq.output_ids), start, end, len(plan.decode))
            if self._on_decode is not None:
                self._on_decode(len(plan.decode))
            ready += plan.decode
            rows.append(decode_logits)
        return ready, (np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float32))

    def _new_prompts(self, admitting: int = 0) -> int:
        """Prompts this step that start an empty row (those being admitted count as such) and so could share
        a pass; 0 if the runner has no shared passes."""
        if not self.runner.prompt_pass_tokens:
            return 0
        return admitting + sum(1 for s in self.scheduler.running
                               if s.status == SeqStatus.PREFILLING and s.prefilled == 0)

    def _prompt_passes(self, plan: StepPlan) -> list[list[tuple[Sequence, int]]]:
        """The step's prompt chunks as forward passes, in plan order: chunks that start an empty row may share
        one; every other chunk runs alone (GQA takes several rows' prompts only without a past)."""
        table, capacity = self.runner.table, self.runner.prompt_pass_tokens
        fresh = [i for i, (seq, _) in enumerate(plan.prefill)
                 if capacity and seq.prefilled == 0 and table.lengths[seq.slot] == 0]
        groups = shared_passes([plan.prefill[i][1] for i in fresh], capacity, self.costs.prefill.intercept,
                               self.costs.prefill.slope)
        first_of = {fresh[g[0]]: [plan.prefill[fresh[j]] for j in g] for g in groups}
        in_group = {fresh[j] for g in groups for j in g}
        return [first_of[i] if i in first_of else [chunk] for i, chunk in enumerate(plan.prefill)
                if i in first_of or i not in in_group]

    def _release(self, seq: Sequence) -> None:
        """The sequence leaves the batch; with the prefix cache on, its slot keeps what it holds."""
        self.scheduler.remove(seq)
        if seq.slot is not None:
            self.runner.table.release(seq.slot, keep_contents=self.reuse)
            seq.slot = None
