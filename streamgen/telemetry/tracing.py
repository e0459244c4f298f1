"""A TracerProvider configured by the standard OTEL_* environment variables.

Honoured: OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER (otlp, console, none),
OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL
(grpc or http/protobuf), OTEL_TRACES_SAMPLER and its argument,
OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. The exporters read their own
headers, timeouts and certificates from the environment too.

With no exporter configured the provider samples nothing: every request
still gets a valid trace id (for logs and the `start` message) but no span is
recorded, and the per-token code skips span creation altogether.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

import streamgen


@dataclass(frozen=True, slots=True)
class ExportConfig:
    traces: str  # otlp | console | none
    metrics: str  # otlp | none (Prometheus /metrics is always there)
    protocol: str  # grpc | http/protobuf


def export_config(env: Mapping[str, str] = os.environ) -> ExportConfig:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ExportConfig("none", "none", "http/protobuf")
    has_endpoint = bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    traces = env.get("OTEL_TRACES_EXPORTER") or ("otlp" if has_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") else "none")
    metrics = env.get("OTEL_METRICS_EXPORTER") or ("otlp" if has_endpoint or env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") else "none")
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf"
    for name, value, allowed in (
        ("OTEL_TRACES_EXPORTER", traces, ("otlp", "console", "none")),
        ("OTEL_METRICS_EXPORTER", metrics, ("otlp", "prometheus", "none")),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol, ("grpc", "http/protobuf")),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(allowed)}")
    return ExportConfig(traces, "none" if metrics == "prometheus" else metrics, protocol)


def make_resource(env: Mapping[str, str] = os.environ, instance: str | None = None) -> Resource:
    """instance: this replica's id (service.instance.id), so a trace says which replica served it."""
    attrs = {"service.version": streamgen.__version__}
    if instance:
        attrs["service.instance.id"] = instance
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win when set; attributes
    # passed here would override them, so only fill the name in when absent.
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = "streamgen"
    return Resource.create(attrs)


def make_tracer_provider(
    config: ExportConfig, resource: Resource, extra_processors: Sequence[SpanProcessor] = ()
) -> TracerProvider:
    processors: list[SpanProcessor] = list(extra_processors)
    if config.traces == "otlp":
        processors.append(BatchSpanProcessor(_otlp_span_exporter(config.protocol)))
    elif config.traces == "console":
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    # No destination: sample nothing (ids are still generated). Otherwise the
    # SDK reads OTEL_TRACES_SAMPLER itself (default: parent-based, always on).
    provider = TracerProvider(resource=resource, sampler=None if processors else ALWAYS_OFF)
    for processor in processors:
        provider.add_span_processor(processor)
    return provider


def _otlp_span_exporter(protocol: str):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()
