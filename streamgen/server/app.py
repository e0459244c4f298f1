"""The Starlette app: routes, lifespan, and the browser client's static files."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from streamgen.config import Settings, api_keys
from streamgen.engine.engine import SHUTTING_DOWN_MESSAGE, Engine, EngineState
from streamgen.engine.loader import LoadedModel
from streamgen.server.openai import openai_routes
from streamgen.server.openai_schema import error_body
from streamgen.server.protocol import PROTOCOL_VERSION
from streamgen.server.security import AccessPolicy, RateLimiter, Refusal
from streamgen.server.service import RequestService
from streamgen.server.shutdown import Drain
from streamgen.server.ws import Connection
from streamgen.telemetry.logs import get_logger
from streamgen.telemetry.metrics import PROMETHEUS_CONTENT_TYPE
from streamgen.telemetry.process import peak_rss_bytes, rss_bytes
from streamgen.telemetry.setup import Telemetry

log = get_logger("streamgen.server")
STATIC = Path(__file__).parent / "static"
WS_PATH = "/v1/ws"


def create_app(settings: Settings, engine: Engine, telemetry: Telemetry | None = None) -> Starlette:
    """The app around an engine that is not started yet. Without telemetry, tracing is off
    (trace ids are still made) and /metrics still works."""
    telemetry = telemetry or Telemetry.from_env(env={})
    telemetry.price_per_hour = settings.price_per_hour
    policy = AccessPolicy(api_keys(settings), settings.allowed_origins)
    service = RequestService(engine, telemetry, RateLimiter(settings.rate_limit), settings.price_per_hour)
    drain = Drain(engine, service, settings.shutdown_grace)
    telemetry.metrics.observe(lambda: _load(engine, drain))
    engine.batch_listeners.append(lambda size: telemetry.metrics.batch_size.record(size))
    engine.mask_listeners.append(lambda seconds: telemetry.metrics.mask_time.record(seconds))
    engine.verify_listeners.append(lambda proposed, kept: telemetry.metrics.accepted_per_pass.record(kept))
    engine.ready_listeners.append(lambda model: setattr(telemetry, "model_name", model.name))
    replica = replica_name(settings)
    app = Starlette(
        routes=[
            Route("/", _index),
            *_health_routes(engine, drain),
            *_info_routes(settings, engine, telemetry, drain),
            WebSocketRoute(WS_PATH, _websocket_endpoint(settings, policy, service, drain)),
            *openai_routes(service, policy, settings.max_message_bytes),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=_lifespan(settings, engine, telemetry),
        middleware=[Middleware(_ReplicaHeader, replica=replica), Middleware(_RequireKey, policy=policy)],
    )
    app.state.drain = drain
    return app


async def _index(request: Request) -> FileResponse:
    return FileResponse(STATIC / "index.html")


def _lifespan(settings: Settings, engine: Engine, telemetry: Telemetry):
    """Start the engine with the app (it loads and warms up in its own thread); stop both with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine.start()
        announce = asyncio.create_task(_announce_when_ready(settings, engine))
        try:
            yield
        finally:
            announce.cancel()
            await asyncio.to_thread(engine.stop)
            await asyncio.to_thread(telemetry.shutdown)

    return lifespan


def _load(engine: Engine, drain: Drain) -> dict[str, int]:
    """What the server holds now: /v1/stats and the metrics' gauges."""
    return {"active_requests": engine.active_requests, "queued_requests": engine.queued_requests,
            "open_connections": len(drain.connections), "kv_utilization": round(engine.kv_utilization, 4)}


def _health_routes(engine: Engine, drain: Drain) -> list[Route]:
    async def live(request: Request) -> JSONResponse:
        return JSONResponse({"status": "live"})

    async def ready(request: Request) -> JSONResponse:
        if drain.started:
            return JSONResponse({"status": "draining"}, status_code=503)
        body = {"status": str(engine.state)}
        if engine.failure:
            body["error"] = engine.failure
        return JSONResponse(body, status_code=200 if engine.state == EngineState.READY else 503)

    return [Route("/health/live", live), Route("/health/ready", ready)]


def _info_routes(settings: Settings, engine: Engine, telemetry: Telemetry, drain: Drain) -> list[Route]:
    async def models(request: Request) -> JSONResponse:
        model = engine.model
        if model is None:
            return JSONResponse(error_body("engine_unavailable", f"the engine is {engine.state}"), status_code=503)
        # OpenAI's shape (object, data[].id/object/created/owned_by); the rest are extras clients ignore.
        return JSONResponse({
            "object": "list",
            "data": [{
                "id": model.manifest.model, "object": "model", "created": model.created, "owned_by": "streamgen",
                "context_length": model.context_length, "device": str(model.runner.device),
                "provider": model.provider, "quantization": model.manifest.quantization,
                "precision": model.manifest.precision, "kv_cache": model.manifest.kv_cache,
                "graph": model.manifest.graph, "max_batch": model.runner.max_slots,
                "batch_invariant": engine.batch_invariant, "kv_cache_bytes": model.kv_bytes,
            }],
            "websocket": {"path": WS_PATH, "protocol_version": PROTOCOL_VERSION},
            "ui": {"jaeger_url": settings.jaeger_url},
        })

    async def stats(request: Request) -> JSONResponse:
        window = engine.ledger.window()
        last_minute: dict[str, float | int | None] = {
            "seconds": round(window.seconds, 1), "busy_s": round(window.busy_s, 3),
            "utilisation": round(window.utilisation, 4), "output_tokens": window.output_tokens,
        }
        if settings.price_per_hour is not None:
            cost = window.cost_per_million_tokens(settings.price_per_hour)
            last_minute["cost_per_million_output_tokens_usd"] = None if cost is None else round(cost, 4)
        speculation = {"proposed_tokens": engine.proposed, "accepted_tokens": engine.accepted,
                       "acceptance_rate": round(engine.accepted / engine.proposed, 4) if engine.proposed else None}
        return JSONResponse({"state": str(engine.state), **_load(engine, drain),
                             "max_batch_size_seen": engine.max_batch_seen, "last_minute": last_minute,
                             "speculation": speculation, "memory": memory_mib(engine.model)})

    async def metrics(request: Request) -> Response:
        return Response(telemetry.metrics.prometheus_text(), media_type=PROMETHEUS_CONTENT_TYPE)

    return [Route("/v1/models", models), Route("/v1/stats", stats), Route("/metrics", metrics)]


def _websocket_endpoint(settings: Settings, policy: AccessPolicy, service: RequestService, drain: Drain):
    async def websocket(ws: WebSocket) -> None:
        offered = ws.scope.get("subprotocols", [])
        refusal = policy.check_websocket(ws.headers, offered)
        if refusal is None and drain.started:
            refusal = Refusal(503, "shutting_down", SHUTTING_DOWN_MESSAGE)
        if refusal is None and len(drain.connections) >= settings.max_connections:
            refusal = Refusal(503, "too_many_connections",
                              f"the server holds its maximum of {settings.max_connections} connections; retry later")
        if refusal is not None:
            service.refuse(refusal.code, refusal.message)
            await _deny(ws, refusal)
            return
        caller = policy.caller(ws.headers, ws.client.host if ws.client else None, offered)
        connection = Connection(ws, service, settings, caller)
        drain.connections.add(connection)
        try:
            await connection.serve()
        finally:
            drain.connections.discard(connection)

    return websocket


# The browser client's files (/, /static) carry no data and must load before
# the user can give a key; the health probes must answer load balancers.
_PUBLIC = ("/", "/health/live", "/health/ready")


def replica_name(settings: Settings) -> str:
    """This replica's name: --replica-id, else the host name (a pod's name in Kubernetes)."""
    return settings.replica_id or socket.gethostname()


REPLICA_HEADER = "x-streamgen-replica"


class _ReplicaHeader:
    """Every HTTP response and accepted WebSocket says which replica served it."""

    def __init__(self, app, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode("latin-1", "replace"))

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def stamped(message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept", "websocket.http.response.start"):
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, stamped)


class _RequireKey:
    """Every HTTP route but the public ones needs the API key (when one is set)."""

    def __init__(self, app, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and path not in _PUBLIC and not path.startswith("/static/"):
            refusal = self.policy.check_http(Headers(scope=scope))
            if refusal is not None:
                response = JSONResponse(error_body(refusal.code, refusal.message), status_code=refusal.status,
                                        headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _deny(ws: WebSocket, refusal: Refusal) -> None:
    """Refuse a handshake with an HTTP status and a JSON reason, where the server supports it."""
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(
            JSONResponse({"error": {"code": refusal.code, "message": refusal.message}}, status_code=refusal.status))
    else:
        await ws.close(code=1008 if refusal.status in (401, 403) else 1013, reason=refusal.message[:120])


def memory_mib(model: LoadedModel | None) -> dict[str, float | None]:
    """The footprint in MiB: the weights as loaded, the KV slots (both fixed at start-up) and the process's
    resident memory now and at its peak (what grows with load: activations, arenas, buffers)."""
    def mib(n: int | None) -> float | None:
        return None if n is None else round(n / 2**20, 1)

    return {"weights_mib": mib(model.weights_bytes) if model else None,
            "kv_cache_mib": mib(model.kv_bytes) if model else None,
            "rss_mib": mib(rss_bytes()), "peak_rss_mib": mib(peak_rss_bytes())}


async def _announce_when_ready(settings: Settings, engine: Engine) -> None:
    ok = await asyncio.to_thread(engine.wait_ready)
    if not ok:
        log.error("engine.failed", error=engine.failure)
        return
    model = engine.model
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    log.info("server.ready", url=f"http://{host}:{settings.port}/", model=model.name, graph=model.manifest.graph,
             build=str(model.manifest.build), device=str(model.runner.device), provider=model.provider,
             slots=model.runner.max_slots, context=model.context_length, batch_invariant=engine.batch_invariant,
             **memory_mib(model))
