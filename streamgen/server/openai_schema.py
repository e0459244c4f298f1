"""The OpenAI API's request and response shapes, without a web framework.

- `chat_spec` / `completion_spec` turn a request body into a RequestSpec
  through the same checks as every transport (server/spec.py and
  SamplingParams), so a bad value gets the same message here as on the
  WebSocket, with `param` naming the field.
- The builders turn engine events into the API's JSON: a whole response, or
  the chunks of a stream. The HTTP routes (server/openai.py) and batch files
  (`streamgen batch`) both use them.

Structured output and tools (server/structured.py) are honoured; fields the
server cannot honour at all (audio, images, the legacy `functions`) are
refused with a 400 that names the field; fields it does not know are
ignored, as the API's own servers do with new optional fields.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamgen.engine.params import SamplingParams
from streamgen.engine.request import FinishEvent, FinishReason, TokenEvent
from streamgen.engine.tools import CallParser, CallPiece, ToolCall, finish_reason as calls_finish_reason
from streamgen.errors import ERROR_CODES, ValidationError
from streamgen.server.structured import Structured, parse_structured
from streamgen.server.spec import RequestSpec, parse_messages, parse_n, parse_prompt, parse_truncate

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
# Sampling fields that mean the same in the API and in SamplingParams (names included).
_SAMPLING = ("temperature", "top_p", "presence_penalty", "frequency_penalty", "seed", "stop", "logit_bias",
             # extensions, as llama.cpp's server and vLLM accept them
             "top_k", "min_p", "repetition_penalty", "ignore_eos", "speculation")
# Fields whose presence asks for something this server does not do.
_REFUSED = {
    "functions": "the legacy functions field is not supported; send tools",
    "function_call": "the legacy function_call field is not supported; send tool_choice",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "suffix": "insertion (suffix) is not supported",
}
_ROLE_ALIASES = {"developer": "system"}  # the API's newer name for a system message


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """A parsed body: what to generate, and how to answer."""

    spec: RequestSpec
    kind: str  # "chat" or "completion": the response's shape
    stream: bool
    include_usage: bool  # stream_options.include_usage
    created: int  # the response's timestamp, fixed at arrival
    max_tokens_field: str = "max_tokens"  # the name the body used, so errors name what the client sent

    @property
    def response_id(self) -> str:
        return self.spec.id

    def client_param(self, param: str | None, message: str) -> tuple[str | None, str]:
        """An error's param and message, in the body's own field names."""
        if param == "max_tokens" and self.max_tokens_field != param:
            return self.max_tokens_field, message.replace("max_tokens", self.max_tokens_field)
        return param, message


def chat_spec(body: Any) -> ApiRequest:
    body = _object(body)
    _refuse_unsupported(body)
    if "messages" not in body:
        raise ValidationError("messages is required", param="messages", code="invalid_request")
    messages = parse_messages(body["messages"], exact_keys=False, roles=_ROLE_ALIASES)
    raw = _sampling(body)
    if _given(body, "logprobs"):
        raw["logprobs"] = body["logprobs"]
    if _given(body, "top_logprobs"):
        raw["top_logprobs"] = body["top_logprobs"]
    params = _params(raw, body)
    return _request(body, "chat", "chatcmpl", prompt=None, messages=messages, params=params,
                    structured=parse_structured(body))


def completion_spec(body: Any) -> ApiRequest:
    body = _object(body)
    _refuse_unsupported(body)
    if _given(body, "echo") and body["echo"]:
        raise ValidationError("echo is not supported", param="echo", code="unsupported")
    if _given(body, "best_of") and body["best_of"] != body.get("n", 1):
        raise ValidationError("best_of is not supported (use n)", param="best_of", code="unsupported")
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise ValidationError("prompt must be a string (or a list holding one string); token-id prompts and "
                                  "batches of prompts are not supported: send one request per prompt",
                                  param="prompt", code="invalid_request")
        prompt = prompt[0]
    raw = _sampling(body)
    if _given(body, "logprobs"):  # the legacy API's logprobs is a count of alternatives, 0-5
        count = body["logprobs"]
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 5:
            raise ValidationError(f"logprobs must be an integer in [0, 5], got {str(count)[:40]}", param="logprobs")
        raw["logprobs"], raw["top_logprobs"] = True, count
    params = _params(raw, body)
    for name in ("tools", "tool_choice"):
        if _given(body, name) and body[name] not in ([], "none"):
            raise ValidationError(f"{name}: tools are for chat; send them to {CHAT_PATH}", param=name,
                                  code="unsupported")
    structured = parse_structured({k: v for k, v in body.items() if k not in ("tools", "tool_choice")})
    return _request(body, "completion", "cmpl", prompt=parse_prompt(prompt), messages=None, params=params,
                    structured=structured)


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise ValidationError(f"the request body must be a JSON object, got {type(body).__name__}",
                              code="invalid_request")
    return body


def _given(body: Mapping[str, Any], name: str) -> bool:
    """Present and not null (clients send null for 'not set')."""
    return body.get(name) is not None


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, why in _REFUSED.items():
        if _given(body, name) and body[name] not in ([], {}):
            raise ValidationError(f"{name}: {why} by this server", param=name, code="unsupported")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise ValidationError("modalities: only [\"text\"] is supported", param="modalities", code="unsupported")


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = {name: body[name] for name in _SAMPLING if _given(body, name)}
    # max_completion_tokens supersedes max_tokens in the API; either is accepted.
    for name in ("max_completion_tokens", "max_tokens"):
        if _given(body, name):
            raw["max_tokens"] = body[name]
            break
    return raw


def _params(raw: dict[str, Any], body: Mapping[str, Any]) -> SamplingParams:
    try:
        return SamplingParams.from_mapping(raw)
    except ValidationError as exc:
        if exc.param == "max_tokens" and _given(body, "max_completion_tokens"):
            raise ValidationError(exc.message.replace("max_tokens", "max_completion_tokens"),
                                  param="max_completion_tokens", code=exc.code) from None
        raise


def _max_tokens_field(body: Mapping[str, Any]) -> str:
    return "max_completion_tokens" if _given(body, "max_completion_tokens") else "max_tokens"


def _request(body: Mapping[str, Any], kind: str, prefix: str, *, prompt: str | None, messages, params,
             structured: Structured) -> ApiRequest:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ValidationError("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise ValidationError("stream_options must be an object", param="stream_options")
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise ValidationError("stream_options.include_usage must be true or false", param="stream_options")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ValidationError("user must be a string", param="user")
    spec = RequestSpec(
        id=f"{prefix}-{uuid.uuid4().hex[:24]}", prompt=prompt, messages=messages, params=params,
        truncate=parse_truncate(body.get("truncate", "refuse"), chat=messages is not None),
        n=parse_n(body.get("n") if _given(body, "n") else 1), user=user[:256] if user else None,
        constraint=structured.constraint, tools=structured.tools, tool_choice=structured.tool_choice,
    )
    return ApiRequest(spec, kind, stream, include_usage, int(time.time()), _max_tokens_field(body))


# ---- responses ---------------------------------------------------------------------


class Tokens:
    """How token ids read in logprobs: their text, and their bytes (the API gives both)."""

    def __init__(self, decode, token_bytes) -> None:
        self._decode = decode
        self._bytes = token_bytes

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self._bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": round(logprob, 6), "bytes": list(raw)}


def chat_logprobs(event: TokenEvent, tokens: Tokens) -> dict[str, Any] | None:
    """One token's entry in choices[].logprobs.content (with its alternatives)."""
    if event.logprob is None:
        return None
    entry = tokens.entry(event.token_id, event.logprob)
    entry["top_logprobs"] = [tokens.entry(t, lp) for t, lp in event.top_logprobs or ()]
    return entry


def usage(prompt_tokens: int, finals: list[FinishEvent], price_per_hour: float | None = None) -> dict[str, Any]:
    """The prompt counts once whatever n is; cached_tokens is the fewest any choice reused. With a price,
    cost_usd (an extension) is the request's share of the machine: its choices' shares added."""
    completion = sum(f.usage.completion_tokens for f in finals)
    body: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": min((f.usage.cached_tokens for f in finals), default=0)},
    }
    speculative = [f.usage for f in finals if f.usage.proposed_tokens is not None]
    if speculative:  # OpenAI's fields for predicted tokens kept and thrown away
        accepted = sum(u.accepted_tokens for u in speculative)
        body["completion_tokens_details"] = {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": sum(u.proposed_tokens for u in speculative) - accepted}
    if price_per_hour is not None:
        body["cost_usd"] = round(sum(f.usage.cost_usd(price_per_hour) for f in finals), 9)
    return body


# The engine's finish reasons as the API names them (docs/openai.md, "Finish reasons"). An engine error is
# never a finish reason: the request answers with an error object instead (a status, or an `error` event
# in a stream). A cancelled choice keeps its own name, as vLLM's "abort" does, rather than pass for a
# natural stop: the client that cancelled by leaving never reads it, but batch output lines, logs and the
# other choices' readers do.
FINISH_REASONS: dict[FinishReason, str] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CANCELLED: "cancelled",
}


def finish_reason(event: FinishEvent) -> str:
    return FINISH_REASONS[event.finish_reason]


def whole_choice(parsed: ApiRequest, index: int, final: FinishEvent, logprobs: list[dict[str, Any]]
                 ) -> dict[str, Any]:
    """One choice of a whole (non-streamed) response, chat or legacy completion. With tools, the text is read
    back into calls (engine/tools.py): message.tool_calls, and finish_reason "tool_calls"."""
    reason = finish_reason(final)
    if parsed.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": final.text}
        if parsed.spec.tool_choice is not None:
            parser = CallParser()
            parser.feed(final.text)
            parser.finish()
            if parser.calls:
                message = {"role": "assistant", "content": parser.content or None,
                           "tool_calls": [tool_call(c) for c in parser.calls]}
                reason = calls_finish_reason(reason, True)
        return {"index": index, "message": message,
                "logprobs": {"content": logprobs} if parsed.spec.params.logprobs else None, "finish_reason": reason}
    return {"index": index, "text": final.text, "logprobs": legacy_logprobs(logprobs, final.text)
            if parsed.spec.params.logprobs else None, "finish_reason": reason}


def tool_call(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_delta(piece: CallPiece) -> dict[str, Any]:
    """A streamed piece of call `piece.index`: its id, type and name first (arguments empty), then arguments
    fragments, which join into the whole call's arguments."""
    if piece.name is not None:
        return {"index": piece.index, "id": piece.id, "type": "function",
                "function": {"name": piece.name, "arguments": ""}}
    return {"index": piece.index, "function": {"arguments": piece.arguments}}


def legacy_logprobs(entries: list[dict[str, Any]], text: str) -> dict[str, Any]:
    """The completions API's older shape: parallel lists, alternatives as {token: logprob}."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{a["token"]: a["logprob"] for a in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


def chunk(request: ApiRequest, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    obj = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": request.response_id, "object": obj, "created": request.created, "model": model,
            "choices": choices, **extra}


def response(request: ApiRequest, model: str, choices: list[dict[str, Any]], usage_body: dict[str, Any]
             ) -> dict[str, Any]:
    obj = "chat.completion" if request.kind == "chat" else "text_completion"
    return {"id": request.response_id, "object": obj, "created": request.created, "model": model,
            "choices": choices, "usage": usage_body}


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(code, "invalid_request_error"), "param": param,
                      "code": code}}


def error_status(code: str) -> int:
    known = ERROR_CODES.get(code)
    return known.status if known and known.status else 400


# The API's error type for a code; the rest are invalid_request_error.
ERROR_TYPES = {
    "unauthorized": "authentication_error", "rate_limited": "rate_limit_error", "overloaded": "rate_limit_error",
    "engine_unavailable": "server_error", "shutting_down": "server_error", "internal": "server_error",
}
