"""The generation loop: prefill, then sample, detokenize, deliver, decode.

`generate` runs one static batch to completion and yields events as each
token is sampled. Each row is a `_Sequence` that owns its sampler, its
detokenizer and its finish state, so the loop itself stays a few lines.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from streamgen.engine.detok import IncrementalDetokenizer
from streamgen.engine.observer import NULL_OBSERVER, RequestObserver
from streamgen.engine.params import MAX_SEED
from streamgen.engine.request import (
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
    Usage,
)
from streamgen.engine.runner import OnnxRunner
from streamgen.engine.sampling import RowSampler, sample
from streamgen.engine.tokenizer import TextTokenizer


class _Sequence:
    """One request's progress through the batch."""

    def __init__(
        self,
        row: int,
        request: GenerationRequest,
        tokenizer: TextTokenizer,
        context_length: int,
        start: float,
        observer: RequestObserver,
    ) -> None:
        self.row = row
        self.request = request
        self.observer = observer
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        self.sampler = RowSampler(params, tokenizer.vocab_size, request.prompt_ids, seed)
        self.detok = IncrementalDetokenizer(tokenizer.decode, request.prompt_ids, params.stop)
        self.max_tokens = min(params.max_tokens, context_length - len(request.prompt_ids))
        self.output_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.start = start
        self.arrival = request.arrival if request.arrival is not None else start
        self.prefill_s = 0.0
        self.first_token_at: float | None = None

    @property
    def running(self) -> bool:
        return self.finish_reason is None

    def accept(self, token_id: int, logprob: float | None, now: float) -> Iterator[Event]:
        """Take a sampled token: stream it, then decide whether the sequence is done."""
        if token_id in self.request.stop_token_ids:
            yield from self.finish(FinishReason.STOP, now)
            return
        self.output_ids.append(token_id)
        self.sampler.observe(token_id)
        detok_start = time.perf_counter()
        step = self.detok.add(token_id)
        done = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = done
        index = len(self.output_ids) - 1
        self.observer.detokenize(index, detok_start, done)
        event = TokenEvent(self.row, index, token_id, step.delta, logprob)
        self.observer.token(event, done)
        yield event
        if step.stopped:
            yield from self.finish(FinishReason.STOP, done, flush=False)
        elif len(self.output_ids) >= self.max_tokens:
            yield from self.finish(FinishReason.LENGTH, done)

    def finish(self, reason: FinishReason, now: float, flush: bool = True) -> Iterator[Event]:
        self.finish_reason = reason
        # Held-back text is released unless a stop string is what held it.
        tail = self.detok.flush() if flush else ""
        n = len(self.output_ids)
        first = self.first_token_at or now
        decode_rate = (n - 1) / (now - first) if n > 1 and now > first else 0.0
        event = FinishEvent(
            self.row,
            reason,
            tail,
            self.detok.text,
            Usage(len(self.request.prompt_ids), n),
            Timings(self.start - self.arrival, first - self.arrival, self.prefill_s, decode_rate, now - self.arrival),
            self.sampler.seed,
        )
        self.observer.finished(event, now)
        yield event


def generate(
    runner: OnnxRunner,
    tokenizer: TextTokenizer,
    requests: Sequence[GenerationRequest],
    is_cancelled: Callable[[int], bool] = lambda row: False,
    observers: Sequence[RequestObserver] | None = None,
) -> Iterator[Event]:
    """Run a batch of validated requests; yield TokenEvents and one FinishEvent per row.

    is_cancelled(row) is checked once per step, so a cancel takes effect
    within one step. observers[row], when given, hears about every phase.
    """
    start = time.perf_counter()
    context = runner.info.context_length
    observers = observers or [NULL_OBSERVER] * len(requests)
    seqs = [_Sequence(row, r, tokenizer, context, start, o) for row, (r, o) in enumerate(zip(requests, observers))]
    state, logits = runner.prefill([r.prompt_ids for r in requests])
    prefilled = time.perf_counter()
    for seq in seqs:
        seq.prefill_s = prefilled - start
        seq.observer.queued(seq.arrival, start)
        seq.observer.prefill(start, prefilled, len(seqs), len(seq.request.prompt_ids))
    next_ids = np.zeros(len(seqs), dtype=np.int64)  # finished rows keep feeding a pad token
    while True:
        # sample -> detokenize -> deliver, for the rows still running
        live = [s for s in seqs if s.running]
        if live:
            sample_start = time.perf_counter()
            picked = sample(logits[[s.row for s in live]], [s.sampler for s in live])
            now = time.perf_counter()
            for seq, token_id, logprob in zip(live, picked.token_ids, picked.logprobs):
                seq.observer.sample(len(seq.output_ids), sample_start, now, len(live))
                next_ids[seq.row] = token_id
                yield from seq.accept(int(token_id), float(logprob) if seq.request.params.logprobs else None, now)
        for seq in seqs:
            if seq.running and is_cancelled(seq.row):
                yield from seq.finish(FinishReason.CANCELLED, time.perf_counter())
        running = [s for s in seqs if s.running]
        if not running:
            return
        # forward: one decode step for the whole batch
        forward_start = time.perf_counter()
        logits = runner.decode(state, next_ids)
        forward_end = time.perf_counter()
        for seq in running:
            seq.observer.forward(len(seq.output_ids), forward_start, forward_end, len(seqs))
