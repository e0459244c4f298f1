"""One request's telemetry: its span tree, its metrics and its log lines.

`RequestTelemetry` is the engine's RequestObserver for a request. The root span
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
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from streamgen.engine.observer import RequestObserver
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import ErrorEvent, FinishEvent, FinishReason, TokenEvent

if TYPE_CHECKING:
    from streamgen.telemetry.setup import Telemetry

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


class RequestTelemetry(RequestObserver):
    def __init__(self, telemetry: Telemetry, request_id: str, operation: str, parent: Context | None) -> None:
        self._tel = telemetry
        self.request_id = request_id
        self.operation = operation
        model = telemetry.model_name
        self._metric_attrs = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
        self.span = telemetry.tracer.start_span(
            f"{operation} {model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={**self._metric_attrs, "gen_ai.provider.name": "streamgen", "gen_ai.response.id": request_id},
        )
        ctx = self.span.get_span_context()
        self.trace_id = format(ctx.trace_id, "032x")
        self.span_id = format(ctx.span_id, "016x")
        self._context = trace.set_span_in_context(self.span)
        self._recording = self.span.is_recording()
        self._per_token = self._recording and telemetry.detail == "token"
        self._arrival = time.perf_counter()  # replaced by the engine's own stamp in queued()
        self._decode_start: float | None = None
        self._steps = 0
        self._admitted = False  # took a slot (and so looked its prompt up in the prefix cache)
        self.log = telemetry.logger.bind(request_id=request_id, trace_id=self.trace_id, span_id=self.span_id)

    # ---- on the event loop, before the engine --------------------------------

    @contextlib.contextmanager
    def tokenize(self) -> Iterator[None]:
        with self._tel.tracer.start_as_current_span("tokenize", context=self._context) if self._recording else contextlib.nullcontext():
            yield

    def accepted(self, params: SamplingParams, prompt_tokens: int, prompt_text: str) -> None:
        if self._recording:
            self.span.set_attributes(request_attributes(params))
            self.span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
        extra = {"prompt": prompt_text} if self._tel.log_prompts else {}
        self.log.info("request.accepted", operation=self.operation, prompt_tokens=prompt_tokens,
                      max_tokens=params.max_tokens, temperature=params.temperature, **extra)
        if not self._tel.log_prompts:
            self.log.debug("request.prompt", prompt=prompt_text)
        self._tel.metrics.input_tokens.add(prompt_tokens, self._metric_attrs)

    def rejected(self, code: str, message: str, param: str | None) -> None:
        """Refused before reaching the engine (validation, overload, not ready)."""
        self.span.set_attribute("error.type", code)
        self.span.set_status(Status(StatusCode.ERROR, message))
        self.span.end()
        self._tel.metrics.requests.add(1, {**self._metric_attrs, "error.type": code})
        self.log.info("request.rejected", code=code, message=message, param=param)

    # ---- RequestObserver: called from the engine's worker thread --------------

    def _child(self, name: str, start: float, end: float, attributes: dict[str, Any] | None = None) -> None:
        span = self._tel.tracer.start_span(name, context=self._context, start_time=_ns(start), attributes=attributes)
        span.end(end_time=_ns(end))

    def queued(self, start: float, end: float) -> None:
        self._arrival = start
        self._admitted = True
        if self._recording:
            self._child("queue", start, end)

    def prefill(self, start: float, end: float, batch_size: int, prompt_tokens: int, cached_tokens: int) -> None:
        if self._recording:
            self._child("prefill", start, end, {"streamgen.batch_size": batch_size,
                                                "streamgen.prompt_tokens": prompt_tokens,
                                                "streamgen.cached_tokens": cached_tokens})

    def forward(self, step: int, start: float, end: float, batch_size: int) -> None:
        if self._decode_start is None:
            self._decode_start = start
        self._steps += 1
        if self._per_token:
            self._child("forward", start, end, {"streamgen.step": step, "streamgen.batch_size": batch_size})

    def sample(self, step: int, start: float, end: float, batch_size: int) -> None:
        if self._per_token:
            self._child("sample", start, end, {"streamgen.step": step, "streamgen.batch_size": batch_size})

    def detokenize(self, step: int, start: float, end: float) -> None:
        if self._per_token:
            self._child("detokenize", start, end, {"streamgen.step": step})

    def token(self, event: TokenEvent, now: float) -> None:
        if event.index == 0:
            self.log.info("request.first_token", time_to_first_token_ms=round((now - self._arrival) * 1000, 2))

    def finished(self, event: FinishEvent | ErrorEvent, now: float) -> None:
        metrics = self._tel.metrics
        if isinstance(event, ErrorEvent):
            self.span.set_attribute("error.type", event.code)
            self.span.set_status(Status(StatusCode.ERROR, event.message))
            self.span.end(end_time=_ns(now))
            metrics.requests.add(1, {**self._metric_attrs, "error.type": event.code})
            self.log.error("request.failed", code=event.code, message=event.message)
            return
        t, usage = event.timings, event.usage
        if self._admitted:
            metrics.prefix_cache_queries.add(1, self._metric_attrs)
            metrics.prefix_cache_query_tokens.add(usage.prompt_tokens, self._metric_attrs)
            metrics.prefix_cache_hit_tokens.add(usage.cached_tokens, self._metric_attrs)
        if self._recording:
            if not self._per_token and self._decode_start is not None:
                self._child("decode", self._decode_start, now, {"streamgen.steps": self._steps})
            self.span.set_attributes({
                "gen_ai.response.finish_reasons": [str(event.finish_reason)],
                "gen_ai.response.model": self._tel.model_name,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
                "gen_ai.usage.cache_read.input_tokens": usage.cached_tokens,
                "streamgen.time_to_first_token_ms": round(t.time_to_first_token_s * 1000, 3),
            })
        self.span.end(end_time=_ns(now))
        metrics.output_tokens.add(usage.completion_tokens, self._metric_attrs)
        metrics.requests.add(1, {**self._metric_attrs, "finish_reason": str(event.finish_reason)})
        metrics.request_duration.record(t.total_s, self._metric_attrs)
        timings = {"queue_ms": round(t.queue_s * 1000, 2), "time_to_first_token_ms": round(t.time_to_first_token_s * 1000, 2),
                   "decode_tokens_per_s": round(t.decode_tokens_per_s, 2), "total_ms": round(t.total_s * 1000, 2),
                   "cached_tokens": usage.cached_tokens, "prefill_tokens": t.prefill_tokens}
        if event.finish_reason == FinishReason.CANCELLED:
            self.log.info("request.cancelled", completion_tokens=usage.completion_tokens, **timings)
            return
        if usage.completion_tokens:
            metrics.time_to_first_token.record(t.time_to_first_token_s, self._metric_attrs)
        if usage.completion_tokens > 1:
            per_token = (t.total_s - t.time_to_first_token_s) / (usage.completion_tokens - 1)
            metrics.time_per_output_token.record(per_token, self._metric_attrs)
        self.log.info("request.finished", finish_reason=str(event.finish_reason), prompt_tokens=usage.prompt_tokens,
                      completion_tokens=usage.completion_tokens, **timings)
