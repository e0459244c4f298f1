"""The OpenAI-compatible HTTP API: POST /v1/chat/completions and /v1/completions.

A thin transport over the request service: parse the body (openai_schema),
start the request, then encode its events as one JSON response or as an SSE
stream (sse-starlette frames it: `data: {json}` events, then `data: [DONE]`).
A client that goes away cancels its request, streamed or not, within one
engine step. docs/openai.md says what is supported and what is refused.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streamgen.engine.request import ErrorEvent, FinishEvent, TokenEvent
from streamgen.engine.tools import CallParser, CallPiece, TextPiece, finish_reason
from streamgen.errors import ValidationError
from streamgen.server import openai_schema as api
from streamgen.server.openai_schema import ApiRequest, Tokens
from streamgen.server.security import AccessPolicy
from streamgen.server.service import Generation, RequestRefused, RequestService
from streamgen.server.spec import parse_json

_SSE_PING_S = 15  # keeps idle proxies from closing a stream that waits in the queue


def openai_routes(service: RequestService, policy: AccessPolicy, max_body_bytes: int) -> list[Route]:
    async def chat(request: Request) -> Response:
        return await _serve(request, api.chat_spec)

    async def completions(request: Request) -> Response:
        return await _serve(request, api.completion_spec)

    async def _serve(request: Request, parse: Callable[[Any], ApiRequest]) -> Response:
        try:
            parsed = parse(await _read_json(request, max_body_bytes))
        except ValidationError as exc:
            refused = service.refuse(exc.code, exc.message, exc.param)
            return error_response(refused.code, refused.message, refused.param)
        caller = policy.caller(request.headers, request.client.host if request.client else None)
        try:
            generation = service.start(parsed.spec, caller)
        except RequestRefused as refused:
            param, message = parsed.client_param(refused.param, refused.message)
            return error_response(refused.code, message, param, refused.retry_after_ms)
        tokenizer = service.engine.model.tokenizer
        tokens = Tokens(tokenizer.decode, tokenizer.token_bytes)
        headers = {"x-request-id": parsed.response_id}
        if parsed.stream:
            return EventSourceResponse(_stream(parsed, generation, tokens, service.price_per_hour), ping=_SSE_PING_S,
                                       headers=headers)
        try:
            return JSONResponse(await _whole(request, parsed, generation, tokens, service.price_per_hour),
                                headers=headers)
        except _Failed as failed:
            return error_response(failed.event.code, failed.event.message)

    return [Route(api.CHAT_PATH, chat, methods=["POST"]), Route(api.COMPLETIONS_PATH, completions, methods=["POST"])]


def error_response(code: str, message: str, param: str | None = None, retry_after_ms: int | None = None) -> Response:
    """The API's error shape and status; a 429 says when to retry in the headers the SDKs honour."""
    headers = {}
    if retry_after_ms is not None:
        headers = {"retry-after-ms": str(retry_after_ms), "retry-after": str(max(1, math.ceil(retry_after_ms / 1000)))}
    return JSONResponse(api.error_body(code, message, param), status_code=api.error_status(code),
                        headers=headers)


async def _read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ValidationError(f"the request body is larger than {limit} bytes", code="payload_too_large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ValidationError(f"the request body is larger than {limit} bytes", code="payload_too_large")
    return parse_json(bytes(body))


# ---- one JSON response ------------------------------------------------------------


async def _whole(request: Request, parsed: ApiRequest, generation: Generation, tokens: Tokens,
                 price: float | None) -> dict[str, Any]:
    """Collect every choice; a client that disconnects meanwhile cancels the request."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
    logprobs: dict[int, list[dict[str, Any]]] = {i: [] for i in range(generation.choices)}
    finals: dict[int, FinishEvent] = {}
    try:
        async for choice, event in generation.events():
            if isinstance(event, TokenEvent) and event.logprob is not None:
                logprobs[choice].append(api.chat_logprobs(event, tokens))
            elif isinstance(event, FinishEvent):
                finals[choice] = event
            elif isinstance(event, ErrorEvent):
                raise _Failed(event)
    finally:
        watcher.cancel()
    choices = [api.whole_choice(parsed, i, finals[i], logprobs[i]) for i in range(generation.choices)]
    return api.response(parsed, generation.started.model, choices,
                        api.usage(generation.started.prompt_tokens, list(finals.values()), price))


class _Failed(Exception):
    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.event = event


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


# ---- a stream ------------------------------------------------------------------


async def _stream(parsed: ApiRequest, generation: Generation, tokens: Tokens,
                  price: float | None) -> AsyncIterator[dict[str, str]]:
    """SSE events as the SDKs parse them: a role delta first (chat), content deltas, a final chunk per choice
    with its finish_reason, the usage chunk when asked for, then [DONE]. An error mid-stream is an
    `error` object, and the stream ends."""
    model, chat = generation.started.model, parsed.kind == "chat"
    finals: list[FinishEvent] = []

    def event(choices: list[dict[str, Any]], **extra: Any) -> dict[str, str]:
        return {"data": json.dumps(api.chunk(parsed, model, choices, **extra), ensure_ascii=False)}

    if chat:
        for i in range(generation.choices):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
    # With tools, each choice's text is read back into calls as it comes (engine/tools.py): answer text goes out
    # as content, calls as tool_calls deltas that join into exactly the whole response's calls.
    calls = [CallParser() for _ in range(generation.choices)] if parsed.spec.tool_choice is not None else None
    async for choice, ev in generation.events():
        if isinstance(ev, TokenEvent):
            if calls is not None:
                for piece in calls[choice].feed(ev.text):
                    yield event([_piece(choice, piece)])
                continue
            if not ev.text and ev.logprob is None:
                continue  # held back (part of a character, or of a possible stop string)
            entry = api.chat_logprobs(ev, tokens)
            yield event([_delta(chat, choice, ev.text, entry)])
        elif isinstance(ev, FinishEvent):
            finals.append(ev)
            reason = api.finish_reason(ev)
            if calls is not None:
                for piece in calls[choice].feed(ev.tail) + calls[choice].finish():
                    yield event([_piece(choice, piece)])
                reason = finish_reason(reason, bool(calls[choice].calls))
            elif ev.tail:
                yield event([_delta(chat, choice, ev.tail, None)])
            done = {"index": choice, "finish_reason": reason, "logprobs": None}
            yield event([{**done, "delta": {}} if chat else {**done, "text": ""}])
        else:
            yield {"data": json.dumps(api.error_body(ev.code, ev.message))}
            return
    if parsed.include_usage:
        yield event([], usage=api.usage(generation.started.prompt_tokens, finals, price))
    yield {"data": "[DONE]"}


def _piece(choice: int, piece: TextPiece | CallPiece) -> dict[str, Any]:
    """A chat chunk's choice for a piece of a tool-using answer: content, or part of a call."""
    delta = {"content": piece.text} if isinstance(piece, TextPiece) else {"tool_calls": [api.tool_call_delta(piece)]}
    return {"index": choice, "delta": delta, "logprobs": None, "finish_reason": None}


def _delta(chat: bool, choice: int, text: str, logprob: dict[str, Any] | None) -> dict[str, Any]:
    if chat:
        return {"index": choice, "delta": {"content": text},
                "logprobs": {"content": [logprob]} if logprob else None, "finish_reason": None}
    legacy = api.legacy_logprobs([logprob], text) if logprob else None
    return {"index": choice, "text": text, "logprobs": legacy, "finish_reason": None}
