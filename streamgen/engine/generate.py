"""Offline generation: drive the step loop over a fixed set of requests.

For the CLI, benchmarks and tests. The server's Engine drives the same
EngineCore from its worker thread, with requests joining and leaving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from streamgen.engine.core import EngineCore, KVRunner
from streamgen.engine.observer import NULL_OBSERVER, RequestObserver
from streamgen.engine.request import Event, GenerationRequest
from streamgen.engine.scheduler import SchedulerLimits
from streamgen.engine.tokenizer import TextTokenizer


def generate(
    runner: KVRunner,
    tokenizer: TextTokenizer,
    requests: Sequence[GenerationRequest],
    is_cancelled: Callable[[int], bool] = lambda key: False,
    observers: Sequence[RequestObserver] | None = None,
    limits: SchedulerLimits | None = None,
    prefix_cache: bool = False,
) -> Iterator[Event]:
    """Yield TokenEvents and one FinishEvent per request; event.key is the request's index.

    Up to runner.max_slots requests decode together; the rest wait for a slot.
    is_cancelled(key) is checked before every step, so a cancel takes effect
    within one step. The prefix cache is off unless asked for, so a run does
    not depend on what earlier runs left in the runner's slots.
    """
    limits = limits or SchedulerLimits(max_waiting=max(1, len(requests)))
    core = EngineCore(runner, tokenizer, limits, prefix_cache=prefix_cache)
    observers = observers or [NULL_OBSERVER] * len(requests)
    seqs = [core.add(r, key, o) for key, (r, o) in enumerate(zip(requests, observers, strict=True))]
    while core.has_work:
        for seq in seqs:
            if seq.running and is_cancelled(seq.key):
                yield from core.cancel(seq)
        yield from core.step()
