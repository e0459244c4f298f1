"""One request's life inside the engine: its status, sampler, detokenizer and output.

A Sequence moves forward through SeqStatus and never back. The core's update
(engine/core.py) is the only caller of the methods that move it; each method
here changes this sequence's own fields and nothing else: no slot, no queue.
How a sequence ended is its status, and FINISH_REASONS is the one table from
a final status to the finish reason every transport reports.
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
    FinishEvent,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
    Usage,
)
from streamgen.engine.sampling import RowSampler
from streamgen.engine.speculation import DraftBudget
from streamgen.engine.tokenizer import TextTokenizer


class SeqStatus(IntEnum):
    """Ordered: a sequence only ever moves forward, and every status from FINISHED_STOPPED on is final."""

    WAITING = 0  # accepted, no slot yet
    PREFILLING = 1  # has a slot; its prompt is partly in the cache
    DECODING = 2  # its prompt is in the cache; one token per step
    FINISHED_STOPPED = 3  # an end-of-sequence token, a stop token or a stop string
    FINISHED_LENGTH = 4  # max_tokens, or the context window
    FINISHED_CANCELLED = 5  # the caller cancelled, or went away
    FINISHED_ERROR = 6  # the engine failed this request (an ErrorEvent, not a FinishEvent)

    @property
    def finished(self) -> bool:
        return self >= SeqStatus.FINISHED_STOPPED


FINISH_REASONS: dict[SeqStatus, FinishReason] = {
    SeqStatus.FINISHED_STOPPED: FinishReason.STOP,
    SeqStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    SeqStatus.FINISHED_CANCELLED: FinishReason.CANCELLED,
    SeqStatus.FINISHED_ERROR: FinishReason.ERROR,
}

INTERNAL_ERROR = ("internal", "generating this request failed; the server log has the details")


class Sequence:
    def __init__(
        self,
        key: int,
        request: GenerationRequest,
        tokenizer: TextTokenizer,
        context_length: int,
        observer: RequestObserver = NULL_OBSERVER,
    ) -> None:
        self.key = key  # the caller's handle for this sequence's events
        self.request = request
        self.observer = observer
        params = request.params
        seed = params.seed if params.seed is not None else secrets.randbelow(MAX_SEED + 1)
        self.sampler = RowSampler(params, tokenizer.vocab_size, request.prompt_ids, seed)
        self.detok = IncrementalDetokenizer(tokenizer.decode, request.prompt_ids, params.stop)
        self.max_tokens = min(params.max_tokens, context_length - len(request.prompt_ids))
        self.prompt_array = np.asarray(request.prompt_ids, dtype=np.int32)  # what the prefix cache compares
        # A constrained request's grammar state: advanced with every token, released when the sequence ends.
        self._grammars = tokenizer.grammars if request.constraint is not None else None
        self.matcher = self._grammars.matcher(request.constraint) if self._grammars is not None else None
        self.status = SeqStatus.WAITING
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens already in the cache
        self.cached_tokens = 0  # of those, how many were reused from the prefix cache instead of run
        self.output_ids: list[int] = []
        self.arrival = request.arrival if request.arrival is not None else time.perf_counter()
        self.started: float | None = None  # left the queue
        self.prefill_s = 0.0
        self.compute_s = 0.0  # this request's share of the steps it was in (engine/core.py, _charge)
        self.first_token_at: float | None = None
        self.speculative = False  # decided once, when it takes its slot (engine/speculation.py)
        self.proposed = 0  # speculative proposals checked, and kept
        self.accepted = 0
        self.drafting = DraftBudget(request.params.speculation)

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
        return not self.status.finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return FINISH_REASONS.get(self.status)

    # ---- moves, called by the core's update only --------------------------------

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

    def prompt_ran(self, tokens: int, seconds: float) -> None:
        """A forward pass put `tokens` more of the prompt in the cache; the last of them makes it a decoder."""
        self.prefilled += tokens
        self.prefill_s += seconds
        if self.remaining_prompt == 0:
            self.status = SeqStatus.DECODING

    def append(self, token_id: int, logprob: float | None,
               top_logprobs: tuple[tuple[int, float], ...] | None) -> tuple[TokenEvent, bool]:
        """Take a sampled token that is not a stop token: returns its event, and whether the text is now done
        (a stop string ends it, or the grammar allows nothing more)."""
        if self.matcher is not None and not self.matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {self.matcher.get_error()[:200]}")
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
        return event, step.stopped or (self.matcher is not None and self.matcher.is_stopped())

    def context(self) -> np.ndarray:
        """Prompt and output so far, int32 [T]: what prompt lookup searches."""
        return np.concatenate([self.prompt_array, np.asarray(self.output_ids, dtype=np.int32)])

    @property
    def at_length(self) -> bool:
        return len(self.output_ids) >= self.max_tokens

    def finish(self, status: SeqStatus, now: float, flush: bool = True,
               error: tuple[str, str] = INTERNAL_ERROR) -> FinishEvent | ErrorEvent:
        """End the sequence with a final status; returns its final event. Held-back text is released unless a
        stop string is what held it (flush=False). FINISHED_ERROR gives an ErrorEvent with `error`'s code and
        message, which a client may see (no internals)."""
        if not status.finished:
            raise ValueError(f"{status.name} is not a final status")
        self.status = status
        if self.matcher is not None:
            self._grammars.release(self.matcher)
            self.matcher = None
        if status == SeqStatus.FINISHED_ERROR:
            event: FinishEvent | ErrorEvent = ErrorEvent(self.key, *error)
            try:
                self.observer.finished(event, now)
            except Exception:  # noqa: BLE001 - telemetry must not turn one failure into two
                pass
            return event
        tail = self.detok.flush() if flush else ""
        n = len(self.output_ids)
        started = self.started if self.started is not None else now
        first = self.first_token_at or now
        decode_rate = (n - 1) / (now - first) if n > 1 and now > first else 0.0
        event = FinishEvent(
            self.key,
            FINISH_REASONS[status],
            tail,
            self.detok.text,
            Usage(self.prompt_len, n, self.cached_tokens, self.compute_s,
                  self.proposed if self.speculative else None, self.accepted),
            Timings(started - self.arrival, first - self.arrival, self.prefill_s, decode_rate, now - self.arrival,
                    self.prefilled - self.cached_tokens),
            self.sampler.seed,
        )
        self.observer.finished(event, now)
        return event
