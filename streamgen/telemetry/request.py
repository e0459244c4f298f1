"""One request's telemetry: its span tree, its metrics and its log lines.

`RequestTelemetry` holds one request's root span; each of its choices has a
`ChoiceTelemetry`, the engine's RequestObserver for that sequence. The root span
is named by the GenAI conventions ("chat SmolLM2-135M-Instruct") and gets the
request, response and usage attributes; its children show where the time went:
tokenize, queue, prefill, then per generated token forward, sample and
detokenize (or, in "request" detail, one decode span). Children are created
after the fact with explicit timestamps from the worker thread, so the hot
loop only takes perf_counter readings.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer

from streamgen.engine.observer import RequestObserver
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import ErrorEvent, FinishEvent, FinishReason, TokenEvent
from streamgen.telemetry.metrics import Metrics


class Recorders(Protocol):
    """What one request's telemetry records with (the Telemetry bundle of telemetry/setup.py is one)."""

    tracer: Tracer
    metrics: Metrics
    logger: Any  # a structlog logger
    detail: str  # "token": spans per token; "request": one decode span
    log_prompts: bool
    model_name: str
    price_per_hour: float | None

# perf_counter() -> nanoseconds since the epoch, for explicit span times.
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()

# SamplingParams field -> span attribute. gen_ai.request.* where the
# conventions define one, streamgen.request.* otherwise.
_PARAM_ATTRIBUTES = {
    "temperature": "gen_ai.request.temperature",
    "top_p": "gen_ai.request.top_p",
    "top_k": "gen_ai.request.top_k",
    "max_tokens": "gen_ai.request.max_tokens",
    "seed": "gen_ai.request.seed",
    "stop": "gen_ai.request.stop_sequences",
    "frequency_penalty": "gen_ai.request.frequency_penalty",
    "presence_penalty": "gen_ai.request.presence_penalty",
    "min_p": "streamgen.request.min_p",
    "repetition_penalty": "streamgen.request.repetition_penalty",
}
_DEFAULTS = SamplingParams()


def _ns(t: float) -> int:
    return int(t * 1e9) + _EPOCH_OFFSET_NS


def request_attributes(params: SamplingParams) -> dict[str, Any]:
    """The gen_ai.request.* attributes of the parameters that were set (differ from the defaults)."""
    attrs: dict[str, Any] = {}
    for name, key in _PARAM_ATTRIBUTES.items():
        value = getattr(params, name)
        if value is None or (value == getattr(_DEFAULTS, name) and name != "max_tokens"):
            continue
        attrs[key] = list(value) if isinstance(value, tuple) else value
    return attrs


class RequestTelemetry:
    """One request: its root span, request-level attributes and log lines, and one observer per choice."""

    def __init__(self, telemetry: Recorders, request_id: str, operation: str, parent: Context | None,
                 choices: int = 1, client_id: str | None = None) -> None:
        """request_id: the server's own, unique; client_id: the id the client chose (a WebSocket request's),
        logged beside it, since clients reuse theirs across connections."""
        self._tel = telemetry
        self.request_id = request_id
        self.operation = operation
        model = telemetry.model_name
        self.metric_attrs = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
        self.span = telemetry.tracer.start_span(
            f"{operation} {model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={**self.metric_attrs, "gen_ai.provider.name": "streamgen", "gen_ai.response.id": request_id,
                        **({"streamgen.client_request_id": client_id} if client_id else {})},
        )
        ctx = self.span.get_span_context()
        self.trace_id = format(ctx.trace_id, "032x")
        self.span_id = format(ctx.span_id, "016x")
        self.context = trace.set_span_in_context(self.span)
        self.recording = self.span.is_recording()
        self.per_token = self.recording and telemetry.detail == "token"
        self.log = telemetry.logger.bind(request_id=request_id, trace_id=self.trace_id, span_id=self.span_id,
                                         **({"client_request_id": client_id} if client_id else {}))
        self._choices = [ChoiceTelemetry(self, i, choices > 1) for i in range(choices)]
        self._finals: dict[int, FinishEvent | ErrorEvent] = {}

    @property
    def metrics(self):
        return self._tel.metrics

    @property
    def price_per_hour(self) -> float | None:
        return self._tel.price_per_hour

    def observer(self, choice: int = 0) -> RequestObserver:
        """What the engine reports to about one of the request's sequences."""
        return self._choices[choice]

    # ---- on the event loop, before the engine --------------------------------

    @contextlib.contextmanager
    def tokenize(self) -> Iterator[None]:
        with self._tel.tracer.start_as_current_span("tokenize", context=self.context) if self.recording else contextlib.nullcontext():
            yield

    def accepted(self, params: SamplingParams, prompt_tokens: int, prompt_text: str, user: str | None = None) -> None:
        if self.recording:
            self.span.set_attributes(request_attributes(params))
            self.span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
            if len(self._choices) > 1:
                self.span.set_attribute("gen_ai.request.choice.count", len(self._choices))
        extra = {"prompt": prompt_text} if self._tel.log_prompts else {}
        if user:
            extra["user"] = user
        self.log.info("request.accepted", operation=self.operation, prompt_tokens=prompt_tokens,
                      max_tokens=params.max_tokens, temperature=params.temperature, choices=len(self._choices),
                      **extra)
        if not self._tel.log_prompts:
            self.log.debug("request.prompt", prompt=prompt_text)
        self.metrics.input_tokens.add(prompt_tokens, self.metric_attrs)

    def constrained(self, constraint) -> None:
        """The request's output is held to a grammar (engine/grammar.py CompiledGrammar): its kind and how long it
        took to compile (0 from the cache), on the span."""
        if self.recording:
            self.span.set_attributes({"streamgen.constraint.kind": constraint.kind,
                                      "streamgen.constraint.compile_ms": round(constraint.compile_ms, 3),
                                      "streamgen.constraint.cached": constraint.cached})
        self.log.info("request.constrained", kind=constraint.kind, compile_ms=round(constraint.compile_ms, 3),
                      cached=constraint.cached)

    def rejected(self, code: str, message: str, param: str | None) -> None:
        """Refused before reaching the engine (validation, overload, not ready)."""
        self.span.set_attribute("error.type", code)
        self.span.set_status(Status(StatusCode.ERROR, message))
        self.span.end()
        self.metrics.refused(code, self.metric_attrs)
        self.log.info("request.rejected", code=code, message=message, param=param)

    # ---- from the choices, on the engine's worker thread -----------------------

    def child(self, name: str, start: float, end: float, attributes: dict[str, Any] | None = None) -> None:
        span = self._tel.tracer.start_span(name, context=self.context, start_time=_ns(start), attributes=attributes)
        span.end(end_time=_ns(end))

    def choice_finished(self, choice: int, event: FinishEvent | ErrorEvent, now: float) -> None:
        """Ends the root span once every choice has ended."""
        self._finals[choice] = event
        if len(self._finals) < len(self._choices):
            return
        finals = [self._finals[i] for i in range(len(self._choices))]
        errors = [e for e in finals if isinstance(e, ErrorEvent)]
        if errors:
            self.span.set_attribute("error.type", errors[0].code)
            self.span.set_status(Status(StatusCode.ERROR, errors[0].message))
        elif self.recording:
            self.span.set_attributes({
                "gen_ai.response.finish_reasons": [str(e.finish_reason) for e in finals],
                "gen_ai.response.model": self._tel.model_name,
                "gen_ai.usage.output_tokens": sum(e.usage.completion_tokens for e in finals),
                "gen_ai.usage.cache_read.input_tokens": min(e.usage.cached_tokens for e in finals),
                "streamgen.time_to_first_token_ms": round(finals[0].timings.time_to_first_token_s * 1000, 3),
            })
            speculative = [e.usage for e in finals if e.usage.proposed_tokens is not None]
            if speculative:
                self.span.set_attributes({
                    "streamgen.speculation.proposed_tokens": sum(u.proposed_tokens for u in speculative),
                    "streamgen.speculation.accepted_tokens": sum(u.accepted_tokens for u in speculative)})
        self.span.end(end_time=_ns(now))


class ChoiceTelemetry(RequestObserver):
    """The engine's observer for one sequence of a request: child spans, per-choice metrics and log lines."""

    def __init__(self, request: RequestTelemetry, index: int, tagged: bool) -> None:
        self._req = request
        self._index = index
        self._tag = {"streamgen.choice": index} if tagged else {}  # only when the request has several
        self.log = request.log.bind(choice=index) if tagged else request.log
        self._arrival = time.perf_counter()  # replaced by the engine's own stamp in queued()
        self._decode_start: float | None = None
        self._steps = 0
        self._admitted = False  # took a slot (and so looked its prompt up in the prefix cache)

    def queued(self, start: float, end: float) -> None:
        self._arrival = start
        self._admitted = True
        if self._req.recording:
            self._req.child("queue", start, end, self._tag or None)

    def prefill(self, start: float, end: float, batch_size: int, prompt_tokens: int, cached_tokens: int) -> None:
        if self._req.recording:
            self._req.child("prefill", start, end, {"streamgen.batch_size": batch_size,
                                                    "streamgen.prompt_tokens": prompt_tokens,
                                                    "streamgen.cached_tokens": cached_tokens, **self._tag})

    def forward(self, step: int, start: float, end: float, batch_size: int) -> None:
        if self._decode_start is None:
            self._decode_start = start
        self._steps += 1
        if self._req.per_token:
            self._req.child("forward", start, end, {"streamgen.step": step, "streamgen.batch_size": batch_size,
                                                    **self._tag})

    def sample(self, step: int, start: float, end: float, batch_size: int) -> None:
        if self._req.per_token:
            self._req.child("sample", start, end, {"streamgen.step": step, "streamgen.batch_size": batch_size,
                                                   **self._tag})

    def detokenize(self, step: int, start: float, end: float) -> None:
        if self._req.per_token:
            self._req.child("detokenize", start, end, {"streamgen.step": step, **self._tag})

    def token(self, event: TokenEvent, now: float) -> None:
        if event.index == 0:
            self.log.info("request.first_token", time_to_first_token_ms=round((now - self._arrival) * 1000, 2))

    def finished(self, event: FinishEvent | ErrorEvent, now: float) -> None:
        req, metrics, attrs = self._req, self._req.metrics, self._req.metric_attrs
        if isinstance(event, ErrorEvent):
            metrics.requests.add(1, {**attrs, "error.type": event.code})
            self.log.error("request.failed", code=event.code, message=event.message)
            req.choice_finished(self._index, event, now)
            return
        t, usage = event.timings, event.usage
        if self._admitted:
            metrics.prefix_cache_queries.add(1, attrs)
            if usage.cached_tokens:
                metrics.prefix_cache_hits.add(1, attrs)
            metrics.prefix_cache_query_tokens.add(usage.prompt_tokens, attrs)
            metrics.prefix_cache_hit_tokens.add(usage.cached_tokens, attrs)
        if req.recording and not req.per_token and self._decode_start is not None:
            req.child("decode", self._decode_start, now, {"streamgen.steps": self._steps, **self._tag})
        metrics.output_tokens.add(usage.completion_tokens, attrs)
        metrics.requests.add(1, {**attrs, "finish_reason": str(event.finish_reason)})
        if (cost := usage.cost_usd(req.price_per_hour)) is not None:
            metrics.cost.add(cost, {**attrs, "finish_reason": str(event.finish_reason)})
        metrics.request_duration.record(t.total_s, attrs)
        timings = {"queue_ms": round(t.queue_s * 1000, 2), "time_to_first_token_ms": round(t.time_to_first_token_s * 1000, 2),
                   "decode_tokens_per_s": round(t.decode_tokens_per_s, 2), "total_ms": round(t.total_s * 1000, 2),
                   "cached_tokens": usage.cached_tokens, "prefill_tokens": t.prefill_tokens}
        if event.finish_reason == FinishReason.CANCELLED:
            self.log.info("request.cancelled", completion_tokens=usage.completion_tokens, **timings)
        else:
            if usage.completion_tokens:
                metrics.time_to_first_token.record(t.time_to_first_token_s, attrs)
            if usage.completion_tokens > 1:
                per_token = (t.total_s - t.time_to_first_token_s) / (usage.completion_tokens - 1)
                metrics.time_per_output_token.record(per_token, attrs)
            self.log.info("request.finished", finish_reason=str(event.finish_reason),
                          prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, **timings)
        req.choice_finished(self._index, event, now)
