"""The batch loop: read ahead a bounded window, keep every slot busy, write each answer as it finishes.

    line -> envelope -> body (the HTTP API's checks) -> admit (the server's admission path) -> window -> engine -> line

The EngineCore runs in this thread, as in engine/generate.py: no server, no event loop.

- Bounded: the window holds at most `read_ahead` x max_batch requests between the file and the engine,
  and the engine only what its slots run; a line that needs no engine (an error) is written at once. The
  only state that grows with the file is 8 bytes per custom_id (files.DigestSet), for duplicates.
- Every slot busy: before each step, requests go from the window to the engine until the sequences it
  runs and waits on fill its slots, so a slot freed at the end of one step is taken at the start of the
  next, while the window keeps the requests' order.
- Order (`prefix`, the default): by prompt token ids, so prompts that share a prefix run close together
  and the prefix cache gives the shared part to all but the first; once the input is read, the rest of
  the window goes longest first, so the last slots to finish hold short requests. `longest` orders the
  whole window by work (prompt + output tokens), `arrival` keeps the file's order.
- Stop: should_stop() is read between lines and between steps. Requests still running are cancelled and
  not written; a rerun with the same output runs them again.
- Telemetry as in the server: each request gets its span, metrics and log lines (Telemetry.start_request,
  the observer per choice), and its span links to one `batch` span for the run.
"""

from __future__ import annotations

import heapq
import itertools
import signal
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from opentelemetry.trace import Link

from streamgen.batch.files import DigestSet, Done, Output, RawLine, count_lines, read_lines
from streamgen.batch.options import BatchOptions
from streamgen.batch.lines import (Entry, LineError, answer_body, error_line, parse_body, parse_envelope,
                                   refusal_line, response_line)
from streamgen.batch.progress import Progress, Summary, Tally, make_progress
from streamgen.engine.config import EngineConfig
from streamgen.engine.core import EngineCore
from streamgen.engine.loader import LoadedModel
from streamgen.engine.request import ErrorEvent, Event, FinishEvent, GenerationRequest, TokenEvent
from streamgen.engine.scheduler import SchedulerLimits
from streamgen.engine.sequence import Sequence
from streamgen.engine.warmup import warm_up
from streamgen.errors import ValidationError
from streamgen.server import openai_schema as api
from streamgen.server.openai_schema import ApiRequest, Tokens
from streamgen.server.service import RequestRefused, admit
from streamgen.server.spec import MAX_CHOICES
from streamgen.telemetry.request import RequestTelemetry
from streamgen.telemetry.setup import Telemetry

@dataclass(slots=True, eq=False)
class _Job:
    """One request between the file and its output line."""

    entry: Entry
    parsed: ApiRequest
    choices: list[GenerationRequest]  # its n sequences
    tel: RequestTelemetry
    finals: dict[int, FinishEvent] = field(default_factory=dict)
    logprobs: list[list[dict[str, Any]]] = field(default_factory=list)  # per choice, when asked for
    seqs: list[Sequence] = field(default_factory=list)
    failed: bool = False

    @property
    def n(self) -> int:
        return self.parsed.spec.n

    @property
    def request(self) -> GenerationRequest:
        return self.choices[0]

    @property
    def work(self) -> int:
        """Tokens the request runs at most: its prompt, and each choice's output."""
        return len(self.request.prompt_ids) + self.n * (self.request.params.max_tokens or 0)


class Window:
    """Requests read but not yet given to the engine, handed out in the batch's order."""

    def __init__(self, capacity: int, order: str) -> None:
        self.capacity = capacity
        self._order = order
        self._heap: list[tuple[Any, int, _Job]] = []
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    @property
    def full(self) -> bool:
        return len(self._heap) >= self.capacity

    def push(self, job: _Job) -> None:
        heapq.heappush(self._heap, (self._key(job), next(self._arrivals), job))

    def pop(self) -> _Job:
        return heapq.heappop(self._heap)[2]

    def input_ended(self) -> None:
        """Nothing more will come: what is left goes longest first, so the run does not end on a long tail."""
        if self._order == "prefix":
            self._order = "longest"
            self._heap = [(self._key(job), arrival, job) for _, arrival, job in self._heap]
            heapq.heapify(self._heap)

    def _key(self, job: _Job) -> Any:
        if self._order == "prefix":
            return job.request.prompt_ids
        if self._order == "longest":
            return -job.work
        return 0  # arrival: the counter decides


class BatchLoop:
    def __init__(self, model: LoadedModel, config: EngineConfig, telemetry: Telemetry, output: Output,
                 done: Done | None = None, options: BatchOptions = BatchOptions(),
                 progress: Progress | None = None) -> None:
        self.model = model
        self.config = config
        self.telemetry = telemetry
        self.output = output
        self.done = done or Done()
        self.options = options
        self.progress = progress
        self.slots = model.runner.max_slots
        # No latency target: nobody watches these tokens arrive, so every step takes all the prompt work
        # the budget allows. The scheduler's queue only ever holds what fills the slots at the next step.
        limits = replace(SchedulerLimits.from_config(config), max_waiting=2 * self.slots + MAX_CHOICES,
                         itl_target_ms=None)
        self.core = EngineCore(model.runner, model.tokenizer, limits, prefix_cache=config.prefix_cache,
                               on_decode=lambda size: telemetry.metrics.batch_size.record(size))
        self.tokens = Tokens(model.tokenizer.decode, model.tokenizer.token_bytes)
        self.window = Window(options.read_ahead * self.slots, options.order)
        self.tally = Tally()
        self._seen = DigestSet()  # custom_ids met in this pass over the input
        self._live: dict[int, tuple[_Job, int]] = {}  # engine key -> (job, choice)
        self._keys = itertools.count()
        self._batch_context = None  # the run's `batch` span, which every request span links to

    def run(self, lines: Iterable[RawLine], should_stop: Callable[[], bool] = lambda: False) -> Summary:
        """Answer every line (or stop when asked); returns the summary of this run."""
        # As the server does before it is ready: ONNX Runtime's lazy set-up is charged to no request, nor
        # counted in the run's busy time.
        warm_up(self.model.runner, self.model.tokenizer, self.model.manifest.quantization)
        start = time.perf_counter()
        batch_span = self.telemetry.tracer.start_span("batch", attributes={
            "gen_ai.request.model": self.model.name, "streamgen.batch.order": self.options.order})
        self._batch_context = batch_span.get_span_context()
        source, ended, finished = iter(lines), False, False
        try:
            while not should_stop():
                if self.progress is not None:
                    self.progress.update(self.tally)
                if not ended:
                    ended = self._read(source, should_stop)
                self._feed()
                if self.core.has_work:
                    self._route(self.core.step())
                elif ended and not self.window:
                    finished = True
                    break
        finally:
            interrupted = self._abandon() or not finished
            batch_span.set_attributes({"streamgen.batch.requests": self.tally.written,
                                       "streamgen.batch.failed": self.tally.failed,
                                       "streamgen.batch.interrupted": interrupted})
            batch_span.end()
        return Summary(replace(self.tally), self.output.path, time.perf_counter() - start, self.core.busy_s,
                       self.options.price_per_hour, interrupted)

    # ---- from the file to the window ----------------------------------------------

    def _read(self, source, should_stop: Callable[[], bool]) -> bool:
        """Fill the window; True when the input has ended."""
        while not self.window.full and not should_stop():
            raw = next(source, None)
            if raw is None:
                self.window.input_ended()
                return True
            self._take(raw)
        return False

    def _take(self, raw: RawLine) -> None:
        """One input line: written at once when it needs no engine, else tokenized into the window.
        The first line with a custom_id claims it (a later one is a duplicate), also when it is skipped
        as done or is no request, so a rerun judges every line as the first run did."""
        try:
            entry = parse_envelope(raw)
        except LineError as exc:
            if exc.custom_id is not None:
                self._seen.add(f"id:{exc.custom_id}")
            self._line_error(raw.number, exc.custom_id, exc.code, exc.message)
            return
        if not self._seen.add(f"id:{entry.custom_id}"):
            self._line_error(raw.number, entry.custom_id, "invalid_request",
                             f"custom_id {entry.custom_id[:80]!r} is used by an earlier line; each must be unique")
            return
        if self.done.has_id(entry.custom_id):
            self.tally.skipped += 1
            return
        try:
            parsed = parse_body(entry)
        except ValidationError as exc:
            self.telemetry.rejected_early(None, exc.code, exc.message, exc.param)
            self._write(refusal_line(entry.custom_id, uuid.uuid4().hex, exc.code, exc.message, exc.param))
            return
        job = self._prepare(entry, parsed)
        if job is not None:
            self.window.push(job)

    def _line_error(self, number: int, custom_id: str | None, code: str, message: str) -> None:
        if self.done.has_line(number):
            self.tally.skipped += 1
            return
        self.telemetry.rejected_early(None, code, message, None)
        self._write(error_line(number, custom_id, code, message))

    def _prepare(self, entry: Entry, parsed: ApiRequest) -> _Job | None:
        """Admit the request through the server's own admission path; a refusal is written at once."""
        link = Link(self._batch_context, {"streamgen.batch.custom_id": entry.custom_id})
        try:
            admitted = admit(parsed.spec, self.model, self.config, self.telemetry, link=link)
        except RequestRefused as refused:
            param, message = parsed.client_param(refused.param, refused.message)
            self._write(refusal_line(entry.custom_id, parsed.spec.id, refused.code, message, param))
            return None
        # Queue time (the request's `queue` span) counts from here: the window is its queue.
        arrival = time.perf_counter()
        return _Job(entry, parsed, [replace(r, arrival=arrival) for r in admitted.choices], admitted.telemetry,
                    logprobs=[[] for _ in range(parsed.spec.n)])

    # ---- from the window to the engine, and back ---------------------------------------

    def _feed(self) -> None:
        scheduler = self.core.scheduler
        while self.window and len(scheduler.running) + len(scheduler.waiting) < self.slots:
            job = self.window.pop()
            for choice, request in enumerate(job.choices):
                key = next(self._keys)
                job.seqs.append(self.core.add(request, key, job.tel.observer(choice)))
                self._live[key] = (job, choice)

    def _route(self, events: list[Event]) -> None:
        for event in events:
            job, choice = self._live[event.key]
            if isinstance(event, TokenEvent):
                if event.logprob is not None:
                    job.logprobs[choice].append(api.chat_logprobs(event, self.tokens))
                continue
            del self._live[event.key]
            if job.failed:
                continue
            if isinstance(event, ErrorEvent):
                self._fail(job, event)
                continue
            job.finals[choice] = event
            if len(job.finals) == job.n:
                self._answer(job)

    def _answer(self, job: _Job) -> None:
        finals = [job.finals[i] for i in range(job.n)]
        prompt_tokens = len(job.request.prompt_ids)
        body = answer_body(job.parsed, self.model.name, prompt_tokens, finals, job.logprobs,
                           self.options.price_per_hour)
        usage = body["usage"]
        self.tally.prompt_tokens += prompt_tokens
        self.tally.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
        self.tally.output_tokens += usage["completion_tokens"]
        self._write(response_line(job.entry.custom_id, job.parsed.response_id, 200, body))

    def _fail(self, job: _Job, event: ErrorEvent) -> None:
        """A choice failed in the engine: the request is answered as HTTP answers it, and its other
        choices stop (the HTTP route stops reading, which cancels them)."""
        job.failed = True
        for seq in job.seqs:
            for cancelled in self.core.cancel(seq):
                self._live.pop(cancelled.key, None)
        self._write(refusal_line(job.entry.custom_id, job.parsed.response_id, event.code, event.message))

    def _write(self, record: dict[str, Any]) -> None:
        self.output.write(record)
        self.tally.written += 1
        response = record["response"]
        if response is None or response["status_code"] != 200:
            self.tally.failed += 1

    def _abandon(self) -> bool:
        """End what was read but not answered (a stop, or an error): running sequences are cancelled and
        waiting requests refused, so their spans end. Nothing is written for them. True if there were any."""
        jobs = {id(job): job for job, _ in self._live.values()}
        for job in jobs.values():
            for seq in job.seqs:
                self.core.cancel(seq)
        self._live.clear()
        left = len(jobs) + len(self.window)
        while self.window:
            self.window.pop().tel.rejected("shutting_down", "the batch stopped before this request ran", None)
        return left > 0


def run_file(input_path: str, output_path: Path, model: LoadedModel, config: EngineConfig, telemetry: Telemetry,
             options: BatchOptions = BatchOptions(), should_stop: Callable[[], bool] = lambda: False,
             progress_stream: TextIO | None = None) -> Summary:
    """`streamgen batch`: answer input_path's requests into output_path, resuming what it already holds."""
    output, done = Output.resume(output_path)
    progress = make_progress(count_lines(input_path), done.lines, progress_stream) if progress_stream else None
    try:
        runner = BatchLoop(model, config, telemetry, output, done, options, progress)
        summary = runner.run(read_lines(input_path), should_stop)
    finally:
        if progress is not None:
            progress.close()
        output.close()
    return summary


class StopSignals:
    """SIGINT and SIGTERM ask the run to stop after the line or step at hand; a second SIGINT stops at once.
    `signal` is the one received (0: none). Install from the main thread."""

    def __init__(self) -> None:
        self.signal = 0
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signal != 0

    def __enter__(self) -> StopSignals:
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
