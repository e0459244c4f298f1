"""One WebSocket connection: a reader loop, a writer loop, a task per request.

The reader parses each frame and dispatches it at once, so a `ping` or a
`cancel` is handled while generations stream. Every outgoing message goes
through one queue to one writer, so messages of concurrent requests never
interleave mid-frame. When the client goes away, every request it had in
flight is cancelled; the engine drops them within one step.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from starlette.websockets import WebSocket, WebSocketState

from streamgen.config import Settings
from streamgen.engine.request import ErrorEvent, FinishEvent, TokenEvent
from streamgen.server import protocol
from streamgen.server.protocol import Cancel, Generate, Ping, ProtocolError
from streamgen.server.security import SUBPROTOCOL
from streamgen.server.service import Caller, Generation, RequestRefused, RequestService

CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001
CLOSE_NORMAL = 1000
_CLOSE = object()  # writer sentinel: flush, then close the socket
_RECENT = 256  # finished request ids remembered per connection


@dataclass(slots=True)
class _InFlight:
    generation: Generation
    task: asyncio.Task


class Connection:
    def __init__(self, websocket: WebSocket, service: RequestService, settings: Settings, caller: Caller) -> None:
        self.ws = websocket
        self.service = service
        self.settings = settings
        # A traceparent on the handshake parents every request of the connection
        # that does not bring its own (the caller carries it).
        self.caller = caller
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._inflight: dict[str, _InFlight] = {}
        # A cancel can cross the request's final message on the wire; cancelling a
        # request that has just finished is then a no-op, not an error.
        self._recently_finished: OrderedDict[str, None] = OrderedDict()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def close(self, code: int, reason: str) -> None:
        """Close after every message already queued has been sent."""
        self._out.put_nowait((_CLOSE, code, reason))

    async def serve(self) -> None:
        offered = self.ws.scope.get("subprotocols", [])
        await self.ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        writer = asyncio.create_task(self._write_loop())
        try:
            await self._read_loop()
        finally:
            for item in self._inflight.values():
                item.generation.cancel()  # the engine stops them within one step
                item.task.cancel()
            self._out.put_nowait(None)
            await asyncio.gather(writer, *(i.task for i in self._inflight.values()), return_exceptions=True)

    # ---- reading -------------------------------------------------------------

    async def _read_loop(self) -> None:
        limit = self.settings.max_message_bytes
        idle = self.settings.idle_timeout or None
        while True:
            try:
                # Only a silent connection with nothing in flight counts as idle.
                message = await asyncio.wait_for(self.ws.receive(), timeout=None if self._inflight else idle)
            except TimeoutError:
                self.close(CLOSE_NORMAL, f"idle for {self.settings.idle_timeout} s")
                message = await self.ws.receive()  # the disconnect that follows our close
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                self._send(protocol.error_message(
                    None, "binary_not_supported", "binary frames are not supported; send JSON text frames"))
                continue
            if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
                await self.ws.close(CLOSE_TOO_BIG, f"message larger than {limit} bytes")
                return
            try:
                self._dispatch(protocol.parse_client_message(text))
            except ProtocolError as exc:
                self.service.telemetry.rejected_early(exc.request_id, exc.code, exc.message, exc.param)
                self._send(protocol.error_message(exc.request_id, exc.code, exc.message, exc.param))

    def _dispatch(self, msg: Generate | Cancel | Ping) -> None:
        if isinstance(msg, Ping):
            self._send(protocol.pong_message(msg.id))
        elif isinstance(msg, Cancel):
            item = self._inflight.get(msg.id)
            if item is None and msg.id in self._recently_finished:
                return
            if item is None:
                raise ProtocolError(f"no request with id {msg.id[:40]!r} is in flight on this connection",
                                    code="unknown_id", param="id", request_id=msg.id)
            item.generation.cancel()
        else:
            self._start(msg)

    def _start(self, msg: Generate) -> None:
        if msg.id in self._inflight:
            raise ProtocolError(f"a request with id {msg.id[:40]!r} is already in flight on this connection",
                                code="duplicate_id", param="id", request_id=msg.id)
        if len(self._inflight) >= self.settings.max_requests_per_connection:
            raise ProtocolError(
                f"at most {self.settings.max_requests_per_connection} requests may be in flight on one connection",
                code="too_many_requests", request_id=msg.id)
        try:
            generation = self.service.start(msg.spec, self.caller)
        except RequestRefused as refused:
            extra = {"retry_after_ms": refused.retry_after_ms} if refused.retry_after_ms is not None else {}
            self._send(protocol.error_message(msg.id, refused.code, refused.message, refused.param, **extra))
            return
        self._send(protocol.start_message(generation.started))
        task = asyncio.create_task(self._stream(msg.id, generation))
        self._inflight[msg.id] = _InFlight(generation, task)

    # ---- streaming and writing ----------------------------------------------

    async def _stream(self, request_id: str, generation: Generation) -> None:
        try:
            async for _, event in generation.events():
                if isinstance(event, TokenEvent):
                    self._send(protocol.token_message(request_id, event))
                elif isinstance(event, FinishEvent):
                    self._send(protocol.done_message(request_id, event, self.service.price_per_hour))
                elif isinstance(event, ErrorEvent):
                    self._send(protocol.engine_error_message(request_id, event))
        finally:
            self._inflight.pop(request_id, None)
            self._recently_finished[request_id] = None
            while len(self._recently_finished) > _RECENT:
                self._recently_finished.popitem(last=False)

    def _send(self, message: dict[str, Any]) -> None:
        self._out.put_nowait(message)

    async def _write_loop(self) -> None:
        while (message := await self._out.get()) is not None:
            if self.ws.client_state != WebSocketState.CONNECTED:
                return
            try:
                if isinstance(message, tuple) and message[0] is _CLOSE:
                    await self.ws.close(message[1], message[2])
                    return
                await self.ws.send_text(json.dumps(message, ensure_ascii=False))
            except Exception:  # noqa: BLE001 - the peer is gone; the reader sees the disconnect
                return
