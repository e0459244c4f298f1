"""One path from a validated request to a stream of typed events, for every transport.

`admit()` is the one admission path, shared by the server and by batch files
(streamgen/batch/): the request's telemetry, then tokenizing and checking it
against the model, then its n sequences. RequestService.start() puts the
per-client rate limit in front of it and submits the sequences to the
threaded engine. Every refusal, whatever the transport and whatever refused
it (a frame that does not parse, a bad field, the rate limit, a full queue),
is counted and logged exactly once, here, and comes back as one exception
type with a stable code. An accepted request is a Generation: a `Started`
value, then (choice, event) pairs of engine events (TokenEvent, then one
FinishEvent or ErrorEvent per choice). Transports only encode these: the
WebSocket as protocol v1, HTTP as OpenAI JSON or SSE. Leaving the event
stream early cancels the request; the engine stops it within one step.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry.trace import Link

from streamgen.engine.config import EngineConfig
from streamgen.engine.engine import Engine, EngineOverloaded, RequestHandle
from streamgen.engine.grammar import GrammarLimits
from streamgen.engine.params import SPECULATION_OFF, Speculation
from streamgen.engine.loader import LoadedModel
from streamgen.engine.request import ErrorEvent, Event, FinishEvent, GenerationRequest, choices, prepare_request
from streamgen.errors import StreamgenError
from streamgen.server.security import Caller, RateLimiter
from streamgen.server.spec import RequestSpec
from streamgen.telemetry.request import RequestTelemetry
from streamgen.telemetry.setup import Telemetry


@dataclass(frozen=True, slots=True)
class Started:
    request_id: str
    model: str
    prompt_tokens: int
    trace_id: str
    truncated_messages: int | None  # only when the request asked for truncate="oldest"


class RequestRefused(Exception):
    """The request was not accepted; nothing ran. `code` is stable (docs/protocol.md, docs/openai.md)."""

    def __init__(self, code: str, message: str, param: str | None = None, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request that passed every check: what the engine runs (its n choices), and its telemetry."""

    request: GenerationRequest
    choices: list[GenerationRequest]
    telemetry: RequestTelemetry


def admit(spec: RequestSpec, model: LoadedModel, config: EngineConfig, telemetry: Telemetry, *,
          namespace: str = "", traceparent: str | None = None, link: Link | None = None) -> Admitted:
    """Start the request's telemetry, tokenize and check it against the model and the server's limits.
    Raises RequestRefused (counted and logged). link: a span the request's span links to (a batch run)."""
    # A client-chosen id (the WebSocket's "r1") repeats across connections: the server logs its own beside it.
    own_id, client_id = (f"req-{uuid.uuid4().hex[:24]}", spec.id) if spec.client_chosen_id else (spec.id, None)
    tel = telemetry.start_request(own_id, spec.operation, spec.traceparent or traceparent, spec.n, client_id)
    if link is not None and tel.recording:
        tel.span.add_link(link.context, link.attributes)
    try:
        with tel.tokenize():
            request = prepare_request(
                model.tokenizer, model.context_length, spec.params, prompt=spec.prompt, messages=spec.messages,
                request_id=spec.id, max_prompt_tokens=config.max_prompt_tokens,
                max_new_tokens=config.max_new_tokens, truncate=spec.truncate, namespace=namespace,
                constraint=spec.constraint, tools=spec.tools,
                speculation=Speculation() if config.speculation == "prompt_lookup" else SPECULATION_OFF,
                grammar_limits=GrammarLimits(config.max_constraint_bytes, config.max_compile_ms))
    except StreamgenError as exc:
        param = getattr(exc, "param", None)
        tel.rejected(exc.code, exc.message, param)
        raise RequestRefused(exc.code, exc.message, param) from None
    tel.accepted(request.params, len(request.prompt_ids), spec.last_user_text(), spec.user)
    if request.constraint is not None:
        tel.constrained(request.constraint)
    return Admitted(request, choices(request, spec.n), tel)


class Generation:
    """An accepted request: its Started value and its choices' events, merged."""

    def __init__(self, started: Started, handles: list[RequestHandle], service: RequestService) -> None:
        self.started = started
        self._handles = handles
        self._service = service
        self._open = len(handles)  # choices without their final event yet

    @property
    def choices(self) -> int:
        return len(self._handles)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice, event) until every choice has its final event. Leaving early cancels the rest."""
        queue = self._handles[0].queue
        try:
            while self._open:
                choice, event = await queue.get()
                if isinstance(event, (FinishEvent, ErrorEvent)):
                    self._open -= 1
                yield choice, event
        finally:
            if self._open:
                self.cancel()
            self._service._closed(self)

    def cancel(self) -> None:
        for handle in self._handles:
            handle.cancel()


class RequestService:
    def __init__(self, engine: Engine, telemetry: Telemetry, limiter: RateLimiter,
                 price_per_hour: float | None = None) -> None:
        self.engine = engine
        self.telemetry = telemetry
        self.limiter = limiter
        self.price_per_hour = price_per_hour  # USD; each answer's usage then carries its cost
        self._open: set[Generation] = set()

    @property
    def in_flight(self) -> int:
        """Accepted requests whose event stream has not ended yet (drain waits for these)."""
        return len(self._open)

    def refuse(self, code: str, message: str, param: str | None = None, request_id: str | None = None,
               retry_after_ms: int | None = None) -> RequestRefused:
        """A request refused before it could be admitted (it did not parse, or the transport refused it):
        counted and logged here, once; returns the exception for the transport to raise or answer with."""
        self.telemetry.rejected_early(request_id, code, message, param)
        return RequestRefused(code, message, param, retry_after_ms)

    def start(self, spec: RequestSpec, caller: Caller) -> Generation:
        """Accept and submit a request, or raise RequestRefused. Call from the event loop."""
        if retry := self.limiter.take(caller.client):
            message = f"more than {self.limiter.per_minute} requests per minute from this client; retry in {retry} ms"
            raise self.refuse(code="rate_limited", message=message, request_id=spec.id, retry_after_ms=retry)
        try:
            model = self.engine.require_ready()
        except StreamgenError as exc:
            raise self.refuse(exc.code, exc.message, request_id=spec.id) from None
        admitted = admit(spec, model, self.engine.config, self.telemetry, namespace=caller.namespace,
                         traceparent=caller.traceparent)
        tel = admitted.telemetry
        try:
            handles = self.engine.submit_all(admitted.choices, [tel.observer(i) for i in range(spec.n)])
        except EngineOverloaded as exc:
            tel.rejected(exc.code, exc.message, None)
            raise RequestRefused(exc.code, exc.message, retry_after_ms=exc.retry_after_ms) from None
        except StreamgenError as exc:
            tel.rejected(exc.code, exc.message, None)
            raise RequestRefused(exc.code, exc.message) from None
        truncated = admitted.request.dropped_messages if spec.truncate == "oldest" else None
        generation = Generation(Started(spec.id, model.name, len(admitted.request.prompt_ids), tel.trace_id,
                                        truncated), handles, self)
        self._open.add(generation)
        return generation

    def _closed(self, generation: Generation) -> None:
        self._open.discard(generation)
