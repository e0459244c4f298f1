"""One WebSocket connection: a reader loop, a writer loop, a task per request.

The reader parses each frame and dispatches it at once, so a `ping` or a
`cancel` is handled while generations stream. Every outgoing message is a
typed value (server/protocol.py) that goes through one bounded queue to one
writer, so messages of concurrent requests never interleave mid-frame. When
the client goes away, every request it had in flight is cancelled; the
engine drops them within one step.

A client that stops reading: the network buffers fill, the writer waits,
and messages pile up in the queue. When `--max-unsent-messages` are waiting,
the connection is closed with 1008 (policy violation) and its requests are
cancelled at once, so a stalled client holds no slots and no memory that
grows with its requests (docs/protocol.md, "Slow readers").
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from starlette.websockets import WebSocket, WebSocketState

from streamgen.config import Settings
from streamgen.engine.request import ErrorEvent, FinishEvent, TokenEvent
from streamgen.engine.tools import CallParser, CallPiece
from streamgen.server.protocol import (
    Cancel,
    DoneMessage,
    ErrorMessage,
    Generate,
    Ping,
    PongMessage,
    ProtocolError,
    ServerMessage,
    StartMessage,
    TokenMessage,
    ToolCallMessage,
    parse_client_message,
)
from streamgen.server.security import SUBPROTOCOL, Caller
from streamgen.server.service import Generation, RequestRefused, RequestService

CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001
CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
_RECENT = 256  # finished request ids remembered per connection

log = structlog.get_logger("streamgen.server")


@dataclass(frozen=True, slots=True)
class Close:
    """Close the socket after every message queued before it has been sent."""

    code: int
    reason: str


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
        self._out: asyncio.Queue[ServerMessage | Close] = asyncio.Queue(maxsize=settings.max_unsent_messages)
        self._writer: asyncio.Task | None = None
        self._closing = False
        self._inflight: dict[str, _InFlight] = {}
        # A cancel can cross the request's final message on the wire; cancelling a
        # request that has just finished is then a no-op: its final message is the answer.
        self._recently_finished: OrderedDict[str, None] = OrderedDict()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def close(self, code: int, reason: str) -> None:
        """Close after every message already queued has been sent."""
        self._send(Close(code, reason))

    async def serve(self) -> None:
        offered = self.ws.scope.get("subprotocols", [])
        await self.ws.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        self._writer = asyncio.create_task(self._write_loop())
        try:
            await self._read_loop()
        finally:
            self._cancel_all()
            self._stop_writer()
            await asyncio.gather(self._writer, *(i.task for i in self._inflight.values()), return_exceptions=True)

    def _stop_writer(self) -> None:
        """The client is gone: the writer stops at its next message (it sends nothing to a closed socket)."""
        try:
            self._out.put_nowait(Close(CLOSE_GOING_AWAY, "client gone"))
        except asyncio.QueueFull:
            self._writer.cancel()  # a stalled writer: nothing it holds will be read

    def _cancel_all(self) -> None:
        for item in self._inflight.values():
            item.generation.cancel()  # the engine stops them within one step
            item.task.cancel()

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
                self._refuse(None, code="binary_not_supported",
                             message="binary frames are not supported; send JSON text frames")
                continue
            if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
                await self.ws.close(CLOSE_TOO_BIG, f"message larger than {limit} bytes")
                return
            try:
                self._dispatch(parse_client_message(text))
            except ProtocolError as exc:
                self._refuse(exc.request_id, exc.code, exc.message, exc.param)

    def _refuse(self, request_id: str | None, code: str, message: str, param: str | None = None) -> None:
        refused = self.service.refuse(code, message, param, request_id)
        self._send(ErrorMessage(request_id, refused.code, refused.message, refused.param))

    def _dispatch(self, msg: Generate | Cancel | Ping) -> None:
        if isinstance(msg, Ping):
            self._send(PongMessage(msg.id))
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
            self._send(ErrorMessage(msg.id, refused.code, refused.message, refused.param, refused.retry_after_ms))
            return
        self._send(StartMessage(generation.started))
        task = asyncio.create_task(self._stream(msg.id, generation, msg.spec.tool_choice is not None))
        self._inflight[msg.id] = _InFlight(generation, task)

    # ---- streaming and writing ----------------------------------------------

    async def _stream(self, request_id: str, generation: Generation, tools: bool) -> None:
        # With tools, tokens stream as always, and the calls they make also come as tool_call messages.
        calls = [CallParser() for _ in range(generation.choices)] if tools else None
        try:
            async for choice, event in generation.events():
                if isinstance(event, TokenEvent):
                    self._send(TokenMessage(request_id, event))
                    for piece in calls[choice].feed(event.text) if calls else ():
                        if isinstance(piece, CallPiece):
                            self._send(ToolCallMessage(request_id, piece))
                elif isinstance(event, FinishEvent):
                    made = None
                    if calls:
                        for piece in calls[choice].feed(event.tail) + calls[choice].finish():
                            if isinstance(piece, CallPiece):
                                self._send(ToolCallMessage(request_id, piece))
                        made = tuple(calls[choice].calls)
                    self._send(DoneMessage(request_id, event, self.service.price_per_hour, made))
                elif isinstance(event, ErrorEvent):
                    self._send(ErrorMessage.of_event(request_id, event))
        finally:
            self._inflight.pop(request_id, None)
            self._recently_finished[request_id] = None
            while len(self._recently_finished) > _RECENT:
                self._recently_finished.popitem(last=False)

    def _send(self, message: ServerMessage | Close) -> None:
        if self._closing:
            return
        if isinstance(message, Close):
            self._closing = True
        try:
            self._out.put_nowait(message)
        except asyncio.QueueFull:
            self._stalled()

    def _stalled(self) -> None:
        """The client has left max_unsent_messages unread: close it now, and free what it holds."""
        self._closing = True
        log.warning("connection.slow_reader", unsent=self._out.qsize(), requests=len(self._inflight),
                    client=self.caller.client)
        self._cancel_all()
        if self._writer is not None:
            self._writer.cancel()  # it waits on a send the client will not read
        reason = f"{self._out.qsize()} messages unread; the client must read what it asked for"
        asyncio.get_running_loop().create_task(self._close_now(CLOSE_POLICY, reason))

    async def _close_now(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, reason)
        except Exception:  # noqa: BLE001 - the peer is gone or the socket already closing
            pass

    async def _write_loop(self) -> None:
        while True:
            message = await self._out.get()
            if self.ws.client_state != WebSocketState.CONNECTED:
                return
            try:
                if isinstance(message, Close):
                    await self.ws.close(message.code, message.reason)
                    return
                await self.ws.send_text(json.dumps(message.payload(), ensure_ascii=False))
            except Exception:  # noqa: BLE001 - the peer is gone; the reader sees the disconnect
                return
