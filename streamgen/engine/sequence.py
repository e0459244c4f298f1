"""One request's life inside the engine: state, sampler, detokenizer, output.

A Sequence moves WAITING -> PREFILLING -> DECODING -> FINISHED. It turns each
sampled token into events (a TokenEvent, and a FinishEvent when a stop
condition is met) and tells its observer about every phase.
"""

from __future__ import annotations

import secrets
import time
from enum import IntEnum

import numpy as np

from streamgen.engine.detok import IncrementalDetokenizer
from streamgen.engine.observer import NULL_OBSERVER, RequestObserver
from streamgen.engine.params import MAX_SEED
from streamgen.engine.request import (
    ErrorEvent,
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
    Usage,
)
from streamgen.engine.sampling import RowSampler
from streamgen.engine.tokenizer import TextTokenizer


class SeqStatus(IntEnum):
    """Ordered: a sequence only ever moves forward."""

    WAITING = 0  # accepted, no slot yet
    PREFILLING = 1  # has a slot; prompt partly in the cache
    DECODING = 2  # prompt in the cache; one token per step
    FINISHED = 3


class Sequence:
    def __init__(
        self,
        key: int,
        request: GenerationRequest,
        tokenizer: TextTokenizer,
        context_length: int,
        observer: RequestObserver = NULL_OBSERVER,
    ) -> None:
        self.key = key  # the caller's handle for events (a row, or a submission number)
        self.request = request
        self.observer = observer
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        self.sampler = RowSampler(params, tokenizer.vocab_size, request.prompt_ids, seed)
        self.detok = IncrementalDetokenizer(tokenizer.decode, request.prompt_ids, params.stop)
        self.max_tokens = min(params.max_tokens, context_length - len(request.prompt_ids))
        self.prompt_array = np.asarray(request.prompt_ids, dtype=np.int32)  # what the prefix cache compares
        self.status = SeqStatus.WAITING
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.cached_tokens = 0  # of those, how many were reused from the prefix cache instead of run
        self.output_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.arrival = request.arrival if request.arrival is not None else time.perf_counter()
        self.started: float | None = None  # left the queue
        self.prefill_s = 0.0
        self.compute_s = 0.0  # this request's share of the steps it was in (engine/core.py, _charge)
        self.first_token_at: float | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def remaining_prompt(self) -> int:
        return self.prompt_len - self.prefilled

    @property
    def namespace(self) -> str:
        return self.request.namespace

    @property
    def running(self) -> bool:
        return self.status < SeqStatus.FINISHED

    def admitted(self, slot: int, now: float, cached: int = 0) -> None:
        """Took a slot that already holds the first `cached` prompt tokens."""
        self.slot = slot
        self.status = SeqStatus.PREFILLING
        self.started = now
        self.observer.queued(self.arrival, now)
        self.reused(cached)

    def reused(self, upto: int) -> None:
        """The slot now holds the prompt up to `upto` without running it (a prefix-cache hit)."""
        if upto > self.prefilled:
            self.cached_tokens += upto - self.prefilled
            self.prefilled = upto

    def accept(self, token_id: int, logprob: float | None, now: float,
               top_logprobs: tuple[tuple[int, float], ...] | None = None) -> list[Event]:
        """Take a sampled token: stream it, then decide whether the sequence is done."""
        if token_id in self.request.stop_token_ids:
            return [self.finish(FinishReason.STOP, now)]
        self.output_ids.append(token_id)
        self.sampler.observe(token_id)
        detok_start = time.perf_counter()
        step = self.detok.add(token_id)
        done = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = done
        index = len(self.output_ids) - 1
        self.observer.detokenize(index, detok_start, done)
        event = TokenEvent(self.key, index, token_id, step.delta, logprob, top_logprobs)
        self.observer.token(event, done)
        if step.stopped:
            return [event, self.finish(FinishReason.STOP, done, flush=False)]
        if len(self.output_ids) >= self.max_tokens:
            return [event, self.finish(FinishReason.LENGTH, done)]
        return [event]

    def finish(self, reason: FinishReason, now: float, flush: bool = True) -> FinishEvent:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason
        # Held-back text is released unless a stop string is what held it.
        tail = self.detok.flush() if flush else ""
        n = len(self.output_ids)
        started = self.started if self.started is not None else now
        first = self.first_token_at or now
        decode_rate = (n - 1) / (now - first) if n > 1 and now > first else 0.0
        event = FinishEvent(
            self.key,
            reason,
            tail,
            self.detok.text,
            Usage(self.prompt_len, n, self.cached_tokens, self.compute_s),
            Timings(started - self.arrival, first - self.arrival, self.prefill_s, decode_rate, now - self.arrival,
                    self.prefilled - self.cached_tokens),
            self.sampler.seed,
        )
        self.observer.finished(event, now)
        return event

    def fail(self, now: float, code: str = "internal",
             message: str = "generating this request failed; the server log has the details") -> ErrorEvent:
        """End the request with an error the client may see (no internals in the message)."""
        self.status = SeqStatus.FINISHED
        self.finish_reason = FinishReason.ERROR
        event = ErrorEvent(self.key, code, message)
        try:
            self.observer.finished(event, now)
        except Exception:  # noqa: BLE001 - telemetry must not turn one failure into two
            pass
        return event
