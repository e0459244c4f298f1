"""Graceful shutdown: stop taking work, let running requests finish, then end the rest.

On SIGTERM (or the first Ctrl-C) the server:
1. stops accepting: /health/ready turns 503, new handshakes and new requests
   are refused with `shutting_down`;
2. gives running and queued requests `--shutdown-grace` seconds to finish;
3. ends whatever is left with an `error` message (`shutting_down`);
4. closes every socket with 1001 (going away), after its last messages;
then uvicorn stops. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import TYPE_CHECKING

import structlog
import uvicorn

from streamgen.engine.engine import SHUTTING_DOWN_MESSAGE, Engine

if TYPE_CHECKING:
    from streamgen.server.service import RequestService
    from streamgen.server.ws import Connection

log = structlog.get_logger("streamgen.server")

_FLUSH_S = 2.0  # how long closing sockets wait for their final messages to go out


class Drain:
    def __init__(self, engine: Engine, service: RequestService, grace_s: float) -> None:
        self.engine = engine
        self.service = service
        self.grace_s = grace_s
        self.started = False
        self.connections: set[Connection] = set()

    async def run(self) -> None:
        self.started = True
        self.engine.draining = True
        log.info("server.draining", grace_s=self.grace_s, active=self.engine.active_requests,
                 queued=self.engine.queued_requests, connections=len(self.connections))
        await self._until(lambda: not (self.engine.active_requests or self.engine.queued_requests), self.grace_s)
        ended = self.engine.active_requests + self.engine.queued_requests
        if ended:
            self.engine.end_all("shutting_down", SHUTTING_DOWN_MESSAGE)
        # Every stream, WebSocket or HTTP, has sent its final message.
        await self._until(lambda: not self.service.in_flight, _FLUSH_S)
        for connection in list(self.connections):
            connection.close(1001, "server shutting down")
        await self._until(lambda: not self.connections, _FLUSH_S)
        log.info("server.drained", ended_with_error=ended)

    @staticmethod
    async def _until(done, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)


class DrainingServer(uvicorn.Server):
    """uvicorn that drains the app before it exits on SIGTERM / SIGINT."""

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain.started or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit()))

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run()
        finally:
            self.should_exit = True
