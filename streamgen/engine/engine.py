"""The engine: the step loop in one worker thread, an asyncio façade for callers.

The request service (server/service.py) submits a validated request's n
sequences with `submit_all` and gets one `RequestHandle` per sequence; their
events (TokenEvents, then exactly one FinishEvent or ErrorEvent each) go to
one asyncio.Queue shared by the request, tagged with the choice. Events cross
from the worker thread to the event loop with `call_soon_threadsafe`: no
polling, and the loop is never blocked by model work.

The worker runs EngineCore (continuous batching): at every step boundary new
requests join, cancelled and finished ones leave and free their slot, and one
forward pass decodes every running request together. Cancel flags are read
once per step, so a cancelled or abandoned request stops within one step.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from enum import StrEnum

import structlog

from streamgen.engine.config import ENGINE_DEFAULTS, EngineConfig
from streamgen.engine.core import EngineCore
from streamgen.engine.loader import LoadedModel
from streamgen.engine.observer import RequestObserver
from streamgen.engine.ledger import Ledger
from streamgen.engine.request import ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent
from streamgen.engine.scheduler import QueueFull, SchedulerLimits
from streamgen.engine.warmup import warm_up
from streamgen.engine.sequence import Sequence
from streamgen.errors import StreamgenError

log = structlog.get_logger("streamgen.engine")

_WAKE = object()  # inbox sentinel: an idle worker wakes up and looks at its stop flag


class EngineState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineOverloaded(StreamgenError):
    code = "overloaded"

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class EngineUnavailable(StreamgenError):
    code = "engine_unavailable"


class ShuttingDown(StreamgenError):
    code = "shutting_down"


SHUTTING_DOWN_MESSAGE = "the server is shutting down; retry on another instance"


class RequestHandle:
    """One submitted sequence, seen from the event loop.

    Its events go to an asyncio queue as (tag, event); sequences of one
    request (its n choices) share a queue and carry their choice as the tag.
    """

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, observer: RequestObserver,
                 queue: asyncio.Queue[tuple[int, Event]], tag: int = 0) -> None:
        self.request = request
        self.observer = observer
        self.tag = tag
        self._loop = loop
        self.queue = queue  # (choice, event), shared by the sequences of one request
        self.cancelled = False  # read by the worker thread once per step
        self.sequence: Sequence | None = None  # set by the worker when it takes the request

    def cancel(self) -> None:
        self.cancelled = True

    def _deliver(self, event: Event) -> None:
        """Called from the worker thread."""
        _hand_over([(self, event)])


def _hand_over(batch: list[tuple[RequestHandle, Event]]) -> None:
    """Give events to their handles' event loop with one cross-thread wake-up per loop, not per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[int, Event]]]] = {}
    for handle, event in batch:
        by_loop.setdefault(handle._loop, []).append((handle.queue, (handle.tag, event)))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more


def _put_all(items: list[tuple[asyncio.Queue, tuple[int, Event]]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class Engine:
    def __init__(self, load: Callable[[], LoadedModel], config: EngineConfig = ENGINE_DEFAULTS) -> None:
        self._load = load
        self.config = config
        self.model: LoadedModel | None = None
        self.core: EngineCore | None = None
        self.state = EngineState.LOADING
        self.failure: str | None = None
        self.load_failed = False  # the model never loaded (as opposed to failing while serving)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # submitted, not yet taken by the worker
        self._pending_lock = threading.Lock()
        self._handles: dict[int, RequestHandle] = {}  # worker-owned: sequence key -> handle
        self._keys = itertools.count()
        self._stopping = False
        self.draining = False  # set at shutdown: no new requests
        self._end_all: tuple[str, str] | None = None  # (code, message) for everything in flight
        self._thread = threading.Thread(target=self._run, name="streamgen-engine", daemon=True)
        self._ready = threading.Event()
        self.batch_listeners: list[Callable[[int], None]] = []  # told each decode step's batch size
        self.mask_listeners: list[Callable[[float], None]] = []  # told each constrained step's mask seconds
        self.verify_listeners: list[Callable[[int, int], None]] = []  # told each verification's proposals, kept
        self.proposed = self.accepted = 0  # speculation's totals since start: /v1/stats' acceptance rate
        # Told the loaded model before the engine reports ready, so that whatever
        # they set up is in place for the first request /health/ready lets in.
        self.ready_listeners: list[Callable[[LoadedModel], None]] = []
        self.max_batch_seen = 0
        self.batch_invariant: bool | None = None  # checked on the loaded build at start-up
        self.ledger = Ledger()  # busy time and output over the last minute
        self._mean_request_s = 1.0  # running mean, for retry_after_ms

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Load and warm up in the worker thread; returns at once. Idempotent."""
        if not self._thread.is_alive() and self.state == EngineState.LOADING and not self._ready.is_set():
            self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state == EngineState.READY

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything in flight and end the worker."""
        self._stopping = True
        self._inbox.put(_WAKE)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.state = EngineState.STOPPED

    # ---- what callers see ----------------------------------------------------------

    @property
    def active_requests(self) -> int:
        core = self.core
        return len(core.scheduler.running) if core else 0

    @property
    def kv_utilization(self) -> float:
        """KV slot tokens held by running requests over the slots' capacity (0-1): what a router weighs."""
        core = self.core
        if core is None:
            return 0.0
        table = core.runner.table
        return float(table.lengths[table.busy].sum()) / (table.size * table.max_context)

    @property
    def queued_requests(self) -> int:
        core = self.core
        return self._pending + (len(core.scheduler.waiting) if core else 0)

    def end_all(self, code: str, message: str) -> None:
        """Fail every request in flight or waiting, at the next step boundary."""
        self._end_all = (code, message)
        self._inbox.put(_WAKE)

    def submit_all(self, requests: list[GenerationRequest], observers: list[RequestObserver]) -> list[RequestHandle]:
        """Queue the sequences of one request together (its n choices): all are taken or none.
        Their handles share one queue of (choice, event)."""
        if self.draining:
            raise ShuttingDown(SHUTTING_DOWN_MESSAGE)
        self.require_ready()
        waiting = self.queued_requests
        if waiting + len(requests) > self.config.max_queued:
            retry = self._retry_after_ms(waiting)
            raise EngineOverloaded(f"the server is at capacity ({waiting} requests waiting); retry in {retry} ms",
                                   retry_after_ms=retry)
        loop, arrival = asyncio.get_running_loop(), time.perf_counter()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        handles = [RequestHandle(replace(r, arrival=arrival), loop, o, queue, tag)
                   for tag, (r, o) in enumerate(zip(requests, observers, strict=True))]
        with self._pending_lock:
            self._pending += len(handles)
        for handle in handles:
            self._inbox.put(handle)
        return handles

    def _retry_after_ms(self, waiting: int) -> int:
        """About when a slot should free up: the queue ahead drains at slots / mean request time."""
        slots = self.model.runner.max_slots if self.model else 1
        return max(100, int(1000 * self._mean_request_s * (waiting / slots + 1) / 2))

    def require_ready(self) -> LoadedModel:
        """The loaded model, or EngineUnavailable saying why there is none."""
        if self.state != EngineState.READY or self.model is None:
            reason = f": {self.failure}" if self.failure else ""
            raise EngineUnavailable(f"the engine is {self.state}{reason}; check /health/ready")
        return self.model

    # ---- the worker thread ------------------------------------------------------

    def _run(self) -> None:
        try:
            model = self._load()
            self.core = EngineCore(
                model.runner,
                model.tokenizer,
                SchedulerLimits.from_config(self.config),
                on_decode=self._decoded,
                prefix_cache=self.config.prefix_cache,
            )
            self.batch_invariant = warm_up(model.runner, model.tokenizer, model.manifest.quantization)
            self.core.on_step = lambda seconds, _: self.ledger.step(seconds)
            self.core.on_masks = lambda seconds: [listener(seconds) for listener in self.mask_listeners]
            self.core.on_verify = self._verified
            for listener in self.ready_listeners:
                listener(model)
            self.model = model
            self.state = EngineState.READY
        except Exception as exc:  # noqa: BLE001 - any load failure marks the engine failed
            self.failure = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.error("engine.load_failed", error=self.failure)
            log.debug("engine.load_failed.traceback", exc_info=True)
            self.load_failed = True
            self.state = EngineState.FAILED
            return
        finally:
            self._ready.set()
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 - the model itself failed: fail everyone cleanly
            log.exception("engine.step_failed")
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            self._fail_all()

    def _loop(self) -> None:
        core = self.core
        while not self._stopping:
            # Idle: block until something arrives (no polling). Busy: just drain.
            self._take(block=not core.has_work)
            self._apply_end_all()
            self._apply_cancels()
            if core.has_work:
                self._deliver(core.step())
        for handle in list(self._handles.values()):
            handle.cancel()
        self._apply_cancels()

    def _take(self, block: bool) -> None:
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return
            block = False
            if item is _WAKE:
                continue
            key = next(self._keys)
            try:
                item.sequence = self.core.add(item.request, key, item.observer)
            except QueueFull as full:  # submit() checks first; this only closes the race between the two
                retry = self._retry_after_ms(full.waiting)
                event = ErrorEvent(key, "overloaded", f"the server is at capacity; retry in {retry} ms",
                                   retry_after_ms=retry)
                item.observer.finished(event, time.perf_counter())
                item._deliver(event)
            else:
                self._handles[key] = item
            finally:
                # Only now: the request counts as queued until the scheduler holds it.
                with self._pending_lock:
                    self._pending -= 1

    def _apply_end_all(self) -> None:
        if self._end_all is None:
            return
        code, message = self._end_all
        self._end_all = None
        for handle in list(self._handles.values()):
            self._deliver(self.core.fail(handle.sequence, code, message))

    def _apply_cancels(self) -> None:
        for handle in [h for h in self._handles.values() if h.cancelled]:
            self._deliver(self.core.cancel(handle.sequence))

    def _deliver(self, events: list[Event]) -> None:
        self.ledger.tokens(sum(isinstance(e, TokenEvent) for e in events))
        batch = []
        for event in events:
            handle = self._handles.get(event.key)
            if handle is None:
                continue
            batch.append((handle, event))
            if isinstance(event, FinishEvent):
                self._mean_request_s = 0.9 * self._mean_request_s + 0.1 * event.timings.total_s
            if isinstance(event, (FinishEvent, ErrorEvent)):
                del self._handles[event.key]
        _hand_over(batch)

    def _verified(self, proposed: int, kept: int) -> None:
        self.proposed += proposed
        self.accepted += kept
        for listener in self.verify_listeners:
            listener(proposed, kept)

    def _decoded(self, batch_size: int) -> None:
        self.max_batch_seen = max(self.max_batch_seen, batch_size)
        for listener in self.batch_listeners:
            listener(batch_size)

    def _fail_all(self) -> None:
        now = time.perf_counter()
        for handle in list(self._handles.values()):
            event = ErrorEvent(0, "internal", "the model failed while generating; see the server log")
            handle.observer.finished(event, now)
            handle._deliver(event)
        self._handles.clear()
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item is not _WAKE:
                event = ErrorEvent(0, "engine_unavailable", "the engine failed; see /health/ready")
                item.observer.finished(event, now)
                item._deliver(event)
