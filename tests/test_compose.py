"""The compose stack, checked statically: Docker cannot run on the machines that run
these tests, so everything up to `docker compose up` is verified here."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


class _ComposeLoader(yaml.SafeLoader):
    """Compose's YAML: accepts its !reset and !override tags."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))


def _load(name: str) -> dict:
    return yaml.load((ROOT / name).read_text(), Loader=_ComposeLoader)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load("compose.yaml")


@pytest.fixture(scope="module")
def collector() -> dict:
    return _load("otel/collector.yaml")


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _host_ports(service: dict) -> list[str]:
    return [str(p).split(":")[0] for p in service.get("ports", []) if ":" in str(p)]


def test_every_referenced_file_exists(compose: dict) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            assert (context / dockerfile).is_file(), f"{name}: {dockerfile} missing"
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).is_file(), f"{name}: {source} missing"
            else:
                assert source in compose.get("volumes", {}), f"{name}: named volume {source} undeclared"
    assert _load("compose.cpu.yaml")["services"]["streamgen"]


def test_host_ports_do_not_clash(compose: dict) -> None:
    ports = [p for s in compose["services"].values() for p in _host_ports(s)]
    assert len(ports) == len(set(ports)), ports
    assert {"8000", "16686", "9090"} <= set(ports)


def test_service_exports_to_the_collector_over_a_port_it_receives(compose: dict, collector: dict) -> None:
    env = _env(compose["services"]["streamgen"])
    endpoint = urlparse(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.hostname == "otel-collector" and "otel-collector" in compose["services"]
    protocols = collector["receivers"]["otlp"]["protocols"]
    kind = "http" if env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") == "http/protobuf" else "grpc"
    assert protocols[kind]["endpoint"].endswith(f":{endpoint.port}")
    assert env["STREAMGEN_TRACE_DETAIL"] == "token", "per-token spans in the stack"


def test_collector_pipelines_use_only_defined_components_and_reach_jaeger(compose: dict, collector: dict) -> None:
    pipelines = collector["service"]["pipelines"]
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in collector.get(kind, {}), f"{name}: {kind[:-1]} {component} is not defined"
    for ext in collector["service"].get("extensions", []):
        assert ext in collector.get("extensions", {})
    traces = pipelines["traces"]["exporters"]
    targets = {urlparse("//" + collector["exporters"][e].get("endpoint", "")).hostname for e in traces}
    assert "jaeger" in targets and "jaeger" in compose["services"]
    assert compose["services"]["jaeger"]["image"].startswith("jaegertracing/jaeger:2"), "Jaeger v2"
    assert "16686" in _host_ports(compose["services"]["jaeger"])


def test_prometheus_scrapes_the_service_metrics(compose: dict) -> None:
    prometheus = compose["services"]["prometheus"]
    config_path = next(v.split(":")[0] for v in prometheus["volumes"] if "prometheus.yml" in v)
    scrape = yaml.safe_load((ROOT / config_path).read_text())["scrape_configs"]
    targets = [t for job in scrape for group in job["static_configs"] for t in group["targets"]]
    assert "streamgen:8000" in targets
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in scrape)


def test_gpu_reserved_by_default_and_cpu_override_removes_it(compose: dict) -> None:
    devices = compose["services"]["streamgen"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in devices)
    cpu = _load("compose.cpu.yaml")["services"]["streamgen"]
    assert cpu["deploy"] == {"__reset__": True}
    assert _env(cpu)["STREAMGEN_DEVICE"] == "cpu"


def test_the_service_serves_the_half_precision_build_on_a_gpu(compose: dict) -> None:
    from streamgen.config import serving_build

    env = _env(compose["services"]["streamgen"])
    assert env["STREAMGEN_DEVICE"] == "auto" and env["STREAMGEN_PRECISION"] == "auto"
    assert "STREAMGEN_PRECISION" not in (ROOT / "Dockerfile").read_text(), "the image leaves the choice to auto"
    assert serving_build(env.get("STREAMGEN_QUANTIZE", "none"), "auto", "auto", "cuda").precision == "fp16"
    assert serving_build("none", "auto", "auto", "cpu").precision == "fp32"


def test_dockerfile_serves_with_the_model_in_a_volume() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in dockerfile and "cudnn" in dockerfile
    assert 'CMD ["streamgen", "serve"]' in dockerfile
    assert "STREAMGEN_HOME=/models" in dockerfile and "VOLUME /models" in dockerfile
    for copied in ("pyproject.toml", "README.md", "streamgen"):
        assert (ROOT / copied).exists()


def test_the_image_serves_without_torch_and_makes_the_toolchain_in_the_volume() -> None:
    from streamgen.models.toolchain import CPU_INDEX, INDEX_ENV

    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs == ["RUN pip install --no-cache-dir ."], "the serving install only, no extras, no torch"
    assert f"{INDEX_ENV}={CPU_INDEX}" in dockerfile, "the toolchain's torch: the CPU build, enough to export"
