"""The engine: model work in one worker thread, an asyncio façade for callers.

Callers (the WebSocket handler) `submit` a validated request and get a
`RequestHandle` whose `events()` async-iterates that request's TokenEvents and
exactly one final event (FinishEvent or ErrorEvent). Events cross from the
worker thread to the event loop with `call_soon_threadsafe` onto an
asyncio.Queue: no polling, and the loop is never blocked by model work.

Scheduling today: the worker takes every waiting request (up to max_batch)
into one static batch and runs it to completion; newcomers wait for the next
batch. Cancels are flags checked once per step, so a cancelled or abandoned
request stops within one step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from enum import StrEnum

import structlog

from streamgen.engine.generate import generate
from streamgen.engine.loader import LoadedModel
from streamgen.engine.observer import NULL_OBSERVER, RequestObserver
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import (
    ErrorEvent,
    Event,
    FinishEvent,
    FinishReason,
    GenerationRequest,
    Timings,
    Usage,
    prepare_request,
)
from streamgen.errors import StreamgenError

log = structlog.get_logger("streamgen.engine")

_STOP = object()  # queue sentinel


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


@dataclass(frozen=True, slots=True)
class EngineLimits:
    max_batch: int = 8  # requests decoded together in one static batch
    max_queued: int = 64  # requests waiting for a batch; more are refused (overloaded)


class RequestHandle:
    """One submitted request, seen from the event loop."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, observer: RequestObserver) -> None:
        self.request = request
        self.observer = observer
        self._loop = loop
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False  # read by the worker thread once per step
        self.finished = False

    def cancel(self) -> None:
        self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            yield event
            if isinstance(event, (FinishEvent, ErrorEvent)):
                return

    def _deliver(self, event: Event) -> None:
        """Called from the worker thread."""
        if isinstance(event, (FinishEvent, ErrorEvent)):
            self.finished = True
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:
            pass  # the event loop is closed: nobody is listening any more


class Engine:
    def __init__(self, load: Callable[[], LoadedModel], limits: EngineLimits = EngineLimits()) -> None:
        self._load = load
        self.limits = limits
        self.model: LoadedModel | None = None
        self.state = EngineState.LOADING
        self.failure: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._active: list[RequestHandle] = []
        self._thread = threading.Thread(target=self._run, name="streamgen-engine", daemon=True)
        self._ready = threading.Event()
        self.batch_listeners: list[Callable[[int], None]] = []  # told each batch's size (metrics)
        self.max_batch_seen = 0

    # ---- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Load and warm up in the worker thread; returns at once. Idempotent."""
        if not self._thread.is_alive() and self.state == EngineState.LOADING and not self._ready.is_set():
            self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        self._ready.wait(timeout)
        return self.state == EngineState.READY

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            for handle in list(self._active):
                handle.cancel()
            self._queue.put(_STOP)
            self._thread.join(timeout)
        self.state = EngineState.STOPPED

    # ---- what callers see --------------------------------------------------

    @property
    def active_requests(self) -> int:
        return len(self._active)

    @property
    def queued_requests(self) -> int:
        return self._queue.qsize()

    def prepare(self, params: SamplingParams, *, prompt=None, messages=None, request_id: str = "") -> GenerationRequest:
        """Tokenize and validate against the loaded model (raises ValidationError)."""
        model = self._require_ready()
        return prepare_request(
            model.tokenizer, model.context_length, params, prompt=prompt, messages=messages, request_id=request_id
        )

    def submit(self, request: GenerationRequest, observer: RequestObserver = NULL_OBSERVER) -> RequestHandle:
        """Queue a validated request. Must be called from the event loop's thread."""
        self._require_ready()
        if self._queue.qsize() >= self.limits.max_queued:
            raise EngineOverloaded(
                f"the server is at capacity ({self.limits.max_queued} requests waiting); retry later",
                retry_after_ms=1000,
            )
        handle = RequestHandle(replace(request, arrival=time.perf_counter()), asyncio.get_running_loop(), observer)
        self._queue.put(handle)
        return handle

    def _require_ready(self) -> LoadedModel:
        if self.state != EngineState.READY or self.model is None:
            reason = f": {self.failure}" if self.failure else ""
            raise EngineUnavailable(f"the engine is {self.state}{reason}; check /health/ready")
        return self.model

    # ---- the worker thread -------------------------------------------------

    def _run(self) -> None:
        try:
            self.model = self._load()
            self._warm_up(self.model)
            self.state = EngineState.READY
        except Exception as exc:  # noqa: BLE001 - any load failure marks the engine failed
            log.exception("engine.load_failed")
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            return
        finally:
            self._ready.set()
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self.limits.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(nxt)
            self._run_batch(batch)

    def _run_batch(self, batch: list[RequestHandle]) -> None:
        live = []
        for handle in batch:
            if handle.cancelled:  # the client left while it waited: skip the work
                event = _cancelled_before_start(handle)
                handle.observer.finished(event, time.perf_counter())
                handle._deliver(event)
            else:
                live.append(handle)
        if not live:
            return
        self._active = live
        self.max_batch_seen = max(self.max_batch_seen, len(live))
        for listener in self.batch_listeners:
            listener(len(live))
        model = self.model
        try:
            for event in generate(
                model.runner,
                model.tokenizer,
                [h.request for h in live],
                is_cancelled=lambda row: live[row].cancelled,
                observers=[h.observer for h in live],
            ):
                live[event.row]._deliver(event)
        except Exception as exc:  # noqa: BLE001 - the session itself failed
            log.exception("engine.step_failed")
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            for handle in live:
                if not handle.finished:
                    event = ErrorEvent(0, "internal", "the model failed while generating; see the server log")
                    handle.observer.finished(event, time.perf_counter())
                    handle._deliver(event)
            self._fail_queued()
        finally:
            self._active = []

    def _fail_queued(self) -> None:
        while True:
            try:
                handle = self._queue.get_nowait()
            except queue.Empty:
                return
            if handle is _STOP:
                self._queue.put(_STOP)
                return
            event = ErrorEvent(0, "engine_unavailable", "the engine failed; see /health/ready")
            handle.observer.finished(event, time.perf_counter())
            handle._deliver(event)

    def _warm_up(self, model: LoadedModel) -> None:
        """One short generation so the first user does not pay for ORT's lazy set-up."""
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        ids = model.tokenizer.encode("Hello")
        request = GenerationRequest(tuple(ids), params, frozenset())
        for _ in generate(model.runner, model.tokenizer, [request]):
            pass


def _cancelled_before_start(handle: RequestHandle) -> FinishEvent:
    waited = time.perf_counter() - (handle.request.arrival or time.perf_counter())
    return FinishEvent(
        0, FinishReason.CANCELLED, "", "", Usage(len(handle.request.prompt_ids), 0),
        Timings(waited, 0.0, 0.0, 0.0, waited), handle.request.params.seed or 0,
    )
