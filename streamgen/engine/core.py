"""The step loop, single-threaded: schedule, run the batch, sample, detokenize, deliver, update.

EngineCore owns the runner's KV slots and the scheduler. `step()` does one
round and returns the events it produced; the threaded Engine and the
offline `generate()` both drive it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Seq
from typing import Protocol

import numpy as np
import structlog

from streamgen.engine.observer import NULL_OBSERVER, RequestObserver
from streamgen.engine.request import Event, FinishReason, GenerationRequest
from streamgen.engine.runner import ModelInfo
from streamgen.engine.sampling import sample
from streamgen.engine.scheduler import Scheduler, SchedulerLimits, StepPlan
from streamgen.engine.sequence import Sequence, SeqStatus
from streamgen.engine.tokenizer import TextTokenizer


log = structlog.get_logger("streamgen.engine")


class KVRunner(Protocol):
    """What the loop needs from a runner: KV slots, prefill into one, decode several."""

    info: ModelInfo
    max_slots: int

    @property
    def free_slots(self) -> int: ...
    def allocate(self) -> int | None: ...
    def free(self, slot: int) -> None: ...
    def prefill(self, slot: int, token_ids: Seq[int]) -> np.ndarray: ...  # [V]
    def decode(self, slots: Seq[int], token_ids: Seq[int]) -> np.ndarray: ...  # [len(slots), V]


class EngineCore:
    def __init__(
        self,
        runner: KVRunner,
        tokenizer: TextTokenizer,
        limits: SchedulerLimits,
        on_decode: Callable[[int], None] | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(limits)
        self._on_decode = on_decode  # told each decode step's batch size

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
        plan = self.scheduler.schedule(self.runner.free_slots)
        now = time.perf_counter()
        for seq in plan.admitted:
            seq.admitted(self.runner.allocate(), now)
        ready, logits = self._run(plan)
        if not ready:
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
        for seq, token_id, logprob in zip(ready, picked.token_ids, picked.logprobs):
            try:
                seq.observer.sample(len(seq.output_ids), sample_start, sampled, len(ready))
                events += seq.accept(int(token_id), float(logprob) if seq.request.params.logprobs else None, sampled)
            except Exception:  # noqa: BLE001 - e.g. detokenization: this request fails, the batch goes on
                events.append(self._fail(seq))
            if not seq.running:
                self._release(seq)
        return events

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

    def _run(self, plan: StepPlan) -> tuple[list[Sequence], np.ndarray]:
        """Prompt chunks one row at a time, then one decode pass for every decoding row.
        Returns the sequences that get a token this step and their logits [N, V]."""
        ready: list[Sequence] = []
        rows: list[np.ndarray] = []
        for seq, n in plan.prefill:
            start = time.perf_counter()
            chunk = seq.request.prompt_ids[seq.prefilled : seq.prefilled + n]
            row_logits = self.runner.prefill(seq.slot, chunk)
            seq.prefilled += n
            end = time.perf_counter()
            seq.prefill_s += end - start
            seq.observer.prefill(start, end, 1, n)
            if seq.remaining_prompt == 0:
                seq.status = SeqStatus.DECODING
                ready.append(seq)
                rows.append(row_logits[None, :])
        if plan.decode:
            start = time.perf_counter()
            decode_logits = self.runner.decode([s.slot for s in plan.decode], [s.output_ids[-1] for s in plan.decode])
            end = time.perf_counter()
            for seq in plan.decode:
                seq.observer.forward(len(seq.output_ids), start, end, len(plan.decode))
            if self._on_decode is not None:
                self._on_decode(len(plan.decode))
            ready += plan.decode
            rows.append(decode_logits)
        return ready, (np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float32))

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        if seq.slot is not None:
            self.runner.free(seq.slot)
            seq.slot = None
