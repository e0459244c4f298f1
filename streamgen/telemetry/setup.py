"""The Telemetry bundle: tracer, metrics, logger and span detail, built once."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Tracer

from streamgen.telemetry.logs import get_logger
from streamgen.telemetry.metrics import Metrics
from streamgen.telemetry.request import RequestTelemetry
from streamgen.telemetry.tracing import ExportConfig, export_config, make_resource, make_tracer_provider

TRACE_DETAILS = ("token", "request")


@dataclass(slots=True)
class Telemetry:
    provider: TracerProvider
    metrics: Metrics
    detail: str = "token"  # per-token child spans, or one decode span per request
    log_prompts: bool = False
    model_name: str = "unknown"
    price_per_hour: float | None = None  # USD; with it, finished requests add their cost to streamgen.cost
    tracer: Tracer = field(init=False)
    logger: object = field(init=False)

    def __post_init__(self) -> None:
        if self.detail not in TRACE_DETAILS:
            raise ValueError(f"trace detail must be one of {', '.join(TRACE_DETAILS)}, got {self.detail!r}")
        self.tracer = self.provider.get_tracer("streamgen")
        self.logger = get_logger("streamgen.request")

    @classmethod
    def from_env(
        cls,
        detail: str = "token",
        log_prompts: bool = False,
        env: Mapping[str, str] = os.environ,
        span_processors: Sequence[SpanProcessor] = (),
        instance: str | None = None,
    ) -> Telemetry:
        """Exporters from the OTEL_* variables; extra span processors (tests) record too. instance: the
        replica's id, on every span and metric as service.instance.id."""
        config: ExportConfig = export_config(env)
        resource = make_resource(env, instance)
        return cls(
            provider=make_tracer_provider(config, resource, span_processors),
            metrics=Metrics(resource, otlp=config.metrics == "otlp", protocol=config.protocol),
            detail=detail,
            log_prompts=log_prompts,
        )

    def start_request(self, request_id: str, operation: str, traceparent: str | None,
                      choices: int = 1, client_id: str | None = None) -> RequestTelemetry:
        return RequestTelemetry(self, request_id, operation, parent_context(traceparent), choices, client_id)

    def rejected_early(self, request_id: str | None, code: str, message: str, param: str | None) -> None:
        """A message refused before it became a request (parse errors, limits): log and count it."""
        self.logger.info("request.rejected", request_id=request_id, code=code, message=message, param=param)
        self.metrics.refused(code, {"gen_ai.request.model": self.model_name})

    def shutdown(self) -> None:
        self.provider.shutdown()  # flushes spans still in the batch processor
        self.metrics.shutdown()


def parent_context(traceparent: str | None) -> Context | None:
    """The caller's trace from a W3C traceparent, or None for a new trace."""
    if not traceparent:
        return None
    return propagate.extract({"traceparent": traceparent})
