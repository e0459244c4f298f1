"""One path from a validated request to a stream of typed events, for every transport.

RequestService.start() does, in order: the per-client rate limit, the
request's telemetry, tokenizing and checking against the model (prepare),
and submitting its n sequences to the engine. Refusals come back as one
exception type with a stable code; an accepted request is a Generation: a
`Started` value, then (choice, event) pairs of engine events (TokenEvent,
then one FinishEvent or ErrorEvent per choice). Transports only encode these:
the WebSocket as protocol v1, HTTP as OpenAI JSON or SSE. Leaving the event
stream early cancels the request; the engine stops it within one step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from streamgen.engine.engine import Engine, EngineOverloaded, RequestHandle
from streamgen.engine.params import MAX_SEED
from streamgen.engine.request import ErrorEvent, Event, FinishEvent, GenerationRequest
from streamgen.errors import StreamgenError
from streamgen.server.security import RateLimiter
from streamgen.server.spec import RequestSpec
from streamgen.telemetry.setup import Telemetry


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, as the transport knows them."""

    client: str  # rate-limit identity: "key:<digest>" or "addr:<ip>"
    namespace: str = ""  # prefix-cache isolation: the API key's digest, "" when the server is open
    traceparent: str | None = None  # the connection's or HTTP request's trace context, if the spec has none


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
        queue = self._handles[0]._events
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

    def start(self, spec: RequestSpec, caller: Caller) -> Generation:
        """Accept and submit a request, or raise RequestRefused. Call from the event loop."""
        if retry := self.limiter.take(caller.client):
            message = f"more than {self.limiter.per_minute} requests per minute from this client; retry in {retry} ms"
            self.telemetry.rejected_early(spec.id, "rate_limited", message, None)
            raise RequestRefused("rate_limited", message, retry_after_ms=retry)
        tel = self.telemetry.start_request(spec.id, spec.operation, spec.traceparent or caller.traceparent, spec.n)
        try:
            with tel.tokenize():
                request = self.engine.prepare(spec.params, prompt=spec.prompt, messages=spec.messages,
                                              request_id=spec.id, truncate=spec.truncate, namespace=caller.namespace)
            tel.accepted(request.params, len(request.prompt_ids), spec.last_user_text(), spec.user)
            handles = self.engine.submit_all(_choices(request, spec.n), [tel.observer(i) for i in range(spec.n)])
        except EngineOverloaded as exc:
            tel.rejected(exc.code, exc.message, None)
            raise RequestRefused(exc.code, exc.message, retry_after_ms=exc.retry_after_ms) from None
        except StreamgenError as exc:
            param = getattr(exc, "param", None)
            tel.rejected(exc.code, exc.message, param)
            raise RequestRefused(exc.code, exc.message, param) from None
        model = self.engine.model.name if self.engine.model else self.telemetry.model_name
        truncated = request.dropped_messages if spec.truncate == "oldest" else None
        generation = Generation(Started(spec.id, model, len(request.prompt_ids), tel.trace_id, truncated), handles,
                                self)
        self._open.add(generation)
        return generation

    def _closed(self, generation: Generation) -> None:
        self._open.discard(generation)


def _choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """n sequences of one prompt; a seeded request's choices get seed, seed + 1, ... (each reproducible)."""
    seed = request.params.seed
    if n == 1 or seed is None:
        return [request] * n
    return [replace(request, params=replace(request.params, seed=(seed + i) % (MAX_SEED + 1))) for i in range(n)]
