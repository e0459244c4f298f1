"""Server metrics: OpenTelemetry instruments, read by Prometheus at /metrics
and pushed over OTLP when that is configured.

Histogram names and bucket boundaries follow the OpenTelemetry GenAI
conventions for model servers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Boundaries from the GenAI semantic conventions (gen_ai.server.* metrics).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
MASK_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST

Gauges = Callable[[], Mapping[str, int]]


class Metrics:
    def __init__(self, resource: Resource, otlp: bool = False, protocol: str = "http/protobuf") -> None:
        self.registry = CollectorRegistry()
        readers: list[MetricReader] = [PrometheusMetricReader(registry=self.registry)]
        if otlp:
            readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter(protocol)))
        self.provider = MeterProvider(resource=resource, metric_readers=readers)
        meter = self.provider.get_meter("streamgen")
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to generate the first token, queue and prefill included",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS)
        self.time_per_output_token = meter.create_histogram(
            "gen_ai.server.time_per_output_token", unit="s",
            description="Time per output token after the first, per successful request",
            explicit_bucket_boundaries_advisory=TPOT_BUCKETS)
        self.request_duration = meter.create_histogram(
            "gen_ai.server.request.duration", unit="s",
            description="Time from acceptance to the final message",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.batch_size = meter.create_histogram(
            "streamgen.engine.batch_size", unit="{request}",
            description="Requests sharing each decode forward pass",
            explicit_bucket_boundaries_advisory=BATCH_BUCKETS)
        self.input_tokens = meter.create_counter(
            "streamgen.tokens.input", unit="{token}", description="Prompt tokens of accepted requests")
        self.output_tokens = meter.create_counter(
            "streamgen.tokens.output", unit="{token}", description="Generated tokens")
        self.prefix_cache_queries = meter.create_counter(
            "streamgen.prefix_cache.queries", unit="{request}",
            description="Requests that looked their prompt up in the prefix cache")
        self.prefix_cache_hits = meter.create_counter(
            "streamgen.prefix_cache.hits", unit="{request}",
            description="Requests that found part of their prompt in the prefix cache (a router's affinity signal)")
        self.prefix_cache_query_tokens = meter.create_counter(
            "streamgen.prefix_cache.query_tokens", unit="{token}", description="Prompt tokens looked up")
        self.prefix_cache_hit_tokens = meter.create_counter(
            "streamgen.prefix_cache.hit_tokens", unit="{token}",
            description="Prompt tokens whose KV was reused from the prefix cache instead of prefilled")
        self.cost = meter.create_counter(
            "streamgen.cost", unit="USD",
            description="What answers cost: each request's share of the engine's busy time at --price-per-hour")
        self.requests = meter.create_counter(
            "streamgen.requests", unit="{request}",
            description="Finished requests, by finish_reason, or by error.type when they failed")
        self.mask_time = meter.create_histogram(
            "streamgen.engine.mask_time", unit="s",
            description="Filling one step's grammar masks for its constrained rows (beside the forward pass)",
            explicit_bucket_boundaries_advisory=MASK_BUCKETS)
        self.accepted_per_pass = meter.create_histogram(
            "streamgen.speculation.accepted", unit="{token}",
            description="Proposals kept by each speculative verification pass",
            explicit_bucket_boundaries_advisory=(0, 1, 2, 3, 4, 6, 8, 12, 16))
        self.constraints_refused = meter.create_counter(
            "streamgen.constraints.refused", unit="{request}",
            description="Requests refused because their response format, structured output or tools could not be "
                        "used (invalid_constraint)")
        self._gauges: Gauges = dict
        for name, key, description in (
            ("streamgen.requests.active", "active_requests", "Requests running: holding a KV slot"),
            ("streamgen.requests.queued", "queued_requests", "Requests waiting for the engine"),
            ("streamgen.connections.open", "open_connections", "Open WebSocket connections"),
        ):
            meter.create_observable_gauge(name, callbacks=[self._gauge_callback(key)], description=description)
        # For routers (Kubernetes' inference gateway reads it as the KV-cache usage, 0-1).
        meter.create_observable_gauge("streamgen.kv_cache.utilization", callbacks=[self._gauge_callback(
            "kv_utilization", whole=False)], description="KV slot tokens in use over the slots' capacity, 0-1")

    def refused(self, code: str, attributes: dict[str, str]) -> None:
        """A request refused with this code: counted by error.type, and, when its constraint was the reason,
        in the refused-constraints counter too."""
        self.requests.add(1, {**attributes, "error.type": code})
        if code == "invalid_constraint":
            self.constraints_refused.add(1, attributes)

    def observe(self, gauges: Gauges) -> None:
        """Where the gauges read their values: a callable returning a stats mapping."""
        self._gauges = gauges

    def _gauge_callback(self, key: str, whole: bool = True):
        def callback(options: CallbackOptions):
            value = self._gauges().get(key, 0)
            yield Observation(int(value) if whole else float(value))

        return callback

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        self.provider.shutdown()


def _otlp_metric_exporter(protocol: str):
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    return OTLPMetricExporter()
