"""WebSocket protocol v1: parse client messages, build server messages.

Parsing is the edge: a frame becomes a typed message or a ProtocolError with
a stable code, the offending field, and the request id when one could be
read. See docs/protocol.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamgen.engine.params import SamplingParams
from streamgen.engine.request import ErrorEvent, FinishEvent, TokenEvent
from streamgen.engine.tools import CallPiece, ToolCall, finish_reason
from streamgen.errors import ValidationError
from streamgen.server.service import Started
from streamgen.server.spec import RequestSpec, parse_json, parse_messages, parse_prompt, parse_truncate
from streamgen.server.structured import FIELDS as STRUCTURED_FIELDS, parse_structured

PROTOCOL_VERSION = 1
MAX_ID_CHARS = 128
_GENERATE_FIELDS = {"type", "id", "prompt", "messages", "params", "traceparent", "truncate", *STRUCTURED_FIELDS}
MAX_TRACEPARENT_CHARS = 256
_CANCEL_FIELDS = {"type", "id"}
_PING_FIELDS = {"type", "id"}


class ProtocolError(ValidationError):
    """A client message that cannot be accepted. `request_id` when known."""

    def __init__(self, message: str, *, code: str, param: str | None = None, request_id: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Generate:
    spec: RequestSpec

    @property
    def id(self) -> str:
        return self.spec.id


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | None


ClientMessage = Generate | Cancel | Ping


def parse_client_message(text: str) -> ClientMessage:
    try:
        raw = parse_json(text, "the message")
    except ValidationError as exc:
        raise ProtocolError(exc.message, code=exc.code) from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"a message must be a JSON object, got {type(raw).__name__}", code="invalid_message")
    kind = raw.get("type")
    request_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    if kind == "generate":
        return _parse_generate(raw, request_id)
    if kind == "cancel":
        _only(raw, _CANCEL_FIELDS, request_id)
        return Cancel(_require_id(raw))
    if kind == "ping":
        _only(raw, _PING_FIELDS, request_id)
        return Ping(_require_id(raw) if "id" in raw else None)
    if kind is None:
        raise ProtocolError("the message has no 'type'; expected generate, cancel or ping",
                            code="invalid_message", param="type", request_id=request_id)
    raise ProtocolError(f"unknown message type {str(kind)[:40]!r}; expected generate, cancel or ping",
                        code="unknown_type", param="type", request_id=request_id)


def _parse_generate(raw: dict, request_id: str | None) -> Generate:
    _only(raw, _GENERATE_FIELDS, request_id)
    rid = _require_id(raw)
    has_prompt, has_messages = "prompt" in raw, "messages" in raw
    if has_prompt == has_messages:
        raise ProtocolError("generate needs exactly one of 'prompt' or 'messages'",
                            code="invalid_request", param="prompt", request_id=rid)
    try:
        prompt = parse_prompt(raw["prompt"]) if has_prompt else None
        messages = parse_messages(raw["messages"]) if has_messages else None
        params = SamplingParams.from_mapping(raw.get("params", {}))
        truncate = parse_truncate(raw.get("truncate", "refuse"), chat=has_messages)
        structured = parse_structured(raw)
        if structured.tool_choice is not None and not has_messages:
            raise ValidationError("tools need messages: a chat the model can answer with calls", param="tools",
                                  code="invalid_constraint")
    except ValidationError as exc:
        raise ProtocolError(exc.message, code=exc.code, param=exc.param, request_id=rid) from None
    traceparent = raw.get("traceparent")
    if traceparent is not None and (not isinstance(traceparent, str) or len(traceparent) > MAX_TRACEPARENT_CHARS):
        raise ProtocolError(f"traceparent must be a W3C traceparent string of at most {MAX_TRACEPARENT_CHARS} characters",
                            code="invalid_message", param="traceparent", request_id=rid)
    return Generate(RequestSpec(rid, prompt, messages, params, truncate, traceparent=traceparent,
                                constraint=structured.constraint, tools=structured.tools,
                                tool_choice=structured.tool_choice, client_chosen_id=True))


def _require_id(raw: Mapping[str, Any]) -> str:
    rid = raw.get("id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_CHARS:
        raise ProtocolError(f"'id' must be a non-empty string of at most {MAX_ID_CHARS} characters",
                            code="invalid_message", param="id")
    return rid


def _only(raw: Mapping[str, Any], allowed: set[str], request_id: str | None) -> None:
    extra = sorted(set(raw) - allowed)
    if extra:
        raise ProtocolError(f"unknown field {extra[0][:40]!r} in a {raw['type']} message; allowed: "
                            f"{', '.join(sorted(allowed))}", code="invalid_message", param=extra[0][:40],
                            request_id=request_id)


# ---- server -> client: typed messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartMessage:
    started: Started

    def payload(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "start", "id": self.started.request_id,
                               "prompt_tokens": self.started.prompt_tokens}
        if self.started.trace_id:
            msg["trace_id"] = self.started.trace_id
        if self.started.truncated_messages is not None:
            msg["truncated_messages"] = self.started.truncated_messages
        return msg


@dataclass(frozen=True, slots=True)
class TokenMessage:
    request_id: str
    event: TokenEvent

    def payload(self) -> dict[str, Any]:
        event = self.event
        msg: dict[str, Any] = {"type": "token", "id": self.request_id, "index": event.index,
                               "token_id": event.token_id, "text": event.text}
        if event.logprob is not None:
            msg["logprob"] = round(event.logprob, 6)
        if event.top_logprobs is not None:
            msg["top_logprobs"] = [{"token_id": t, "logprob": round(lp, 6)} for t, lp in event.top_logprobs]
        return msg


@dataclass(frozen=True, slots=True)
class ToolCallMessage:
    """A piece of a tool call, as the OpenAI API's delta.tool_calls[] carries it: id and name first, then
    fragments of the arguments' JSON text."""

    request_id: str
    piece: CallPiece

    def payload(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "tool_call", "id": self.request_id, "index": self.piece.index,
                               "call_id": self.piece.id}
        if self.piece.name is not None:
            msg["name"] = self.piece.name
        msg["arguments"] = self.piece.arguments
        return msg


@dataclass(frozen=True, slots=True)
class DoneMessage:
    request_id: str
    event: FinishEvent
    price_per_hour: float | None = None
    tool_calls: tuple[ToolCall, ...] | None = None  # with tools: the calls the answer made (maybe none)

    def payload(self) -> dict[str, Any]:
        event, t = self.event, self.event.timings
        usage: dict[str, Any] = {"prompt_tokens": event.usage.prompt_tokens,
                                 "completion_tokens": event.usage.completion_tokens,
                                 "cached_tokens": event.usage.cached_tokens}
        if (cost := event.usage.cost_usd(self.price_per_hour)) is not None:
            usage["cost_usd"] = round(cost, 9)
        if event.usage.proposed_tokens is not None:  # the request speculated (docs/protocol.md, "Speculation")
            usage["proposed_tokens"] = event.usage.proposed_tokens
            usage["accepted_tokens"] = event.usage.accepted_tokens
        calls = None if self.tool_calls is None else [
            {"id": c.id, "name": c.name, "arguments": c.arguments} for c in self.tool_calls]
        extra = {} if calls is None else {"tool_calls": calls}
        return {
            "type": "done",
            "id": self.request_id,
            "finish_reason": finish_reason(str(event.finish_reason), bool(calls)),
            **extra,
            "tail": event.tail,
            "text": event.text,
            "usage": usage,
            "timings": {
                "queue_ms": round(t.queue_s * 1000, 2),
                "time_to_first_token_ms": round(t.time_to_first_token_s * 1000, 2),
                "prefill_ms": round(t.prefill_s * 1000, 2),
                "prefill_tokens": t.prefill_tokens,
                "decode_tokens_per_s": round(t.decode_tokens_per_s, 2),
                "total_ms": round(t.total_s * 1000, 2),
            },
            "seed": event.seed,
        }


@dataclass(frozen=True, slots=True)
class ErrorMessage:
    request_id: str | None
    code: str
    message: str
    param: str | None = None
    retry_after_ms: int | None = None

    @classmethod
    def of_event(cls, request_id: str, event: ErrorEvent) -> ErrorMessage:
        return cls(request_id, event.code, event.message, retry_after_ms=event.retry_after_ms)

    def payload(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "error", "id": self.request_id, "code": self.code, "message": self.message,
                               "param": self.param}
        if self.retry_after_ms is not None:
            msg["retry_after_ms"] = self.retry_after_ms
        return msg


@dataclass(frozen=True, slots=True)
class PongMessage:
    ping_id: str | None

    def payload(self) -> dict[str, Any]:
        return {"type": "pong", "id": self.ping_id} if self.ping_id else {"type": "pong"}


ServerMessage = StartMessage | TokenMessage | ToolCallMessage | DoneMessage | ErrorMessage | PongMessage
