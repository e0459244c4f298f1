"""One line of a batch: an OpenAI Batch API request in, its output line out.

Input, one request a line (the Batch API's input format):
    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}
The body goes through the HTTP API's own checks (openai_schema.chat_spec / completion_spec), so a bad
value is refused with the same status, code, param and message as over HTTP. `stream: true` is refused
(`unsupported`): a batch answers every request whole.

Output, one line per input line, in the order requests finish (the Batch API's output format):
    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "chatcmpl-...",
     "body": {...}}, "error": null}
- the body is what the HTTP API answers: a chat.completion or text_completion, or its error body with
  the status HTTP would give (a 400 for a bad value, a 500 when the engine failed on the request);
- a line that is no request at all (not JSON, no custom_id, a custom_id already used, not POST, a url
  other than the two routes) gets `response: null` and `error: {"code", "message", "line"}`, where
  `line` (an extension) is the input line's number, since such a line may carry no usable custom_id.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from streamgen.batch.files import RawLine
from streamgen.engine.request import FinishEvent
from streamgen.errors import ValidationError
from streamgen.server import openai_schema as api
from streamgen.server.openai_schema import ApiRequest
from streamgen.server.spec import parse_json, require_unicode

ROUTES: dict[str, Callable[[Any], ApiRequest]] = {api.CHAT_PATH: api.chat_spec,
                                                   api.COMPLETIONS_PATH: api.completion_spec}


@dataclass(frozen=True, slots=True)
class Entry:
    """A line that names a request: its envelope is valid, its body not yet checked."""

    line: int
    custom_id: str
    url: str
    body: Any


class LineError(Exception):
    """The line is not a request (no response at all; see the module's docstring)."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id


def parse_envelope(raw: RawLine) -> Entry:
    """The line's custom_id, method and url, checked; raises LineError."""
    if raw.data is None:
        raise LineError("payload_too_large", "the line is longer than 1 MiB")
    try:
        obj = parse_json(raw.data, "the line")
    except ValidationError as exc:
        raise LineError(exc.code, exc.message) from None
    if not isinstance(obj, Mapping):
        raise LineError("invalid_request", f"the line must be a JSON object, got {type(obj).__name__}")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("invalid_request", "custom_id must be a non-empty string")
    try:
        require_unicode(custom_id, "custom_id")
    except ValidationError as exc:
        raise LineError("invalid_request", exc.message) from None
    if obj.get("method") != "POST":
        raise LineError("invalid_request", f"method must be POST, got {str(obj.get('method'))[:40]!r}", custom_id)
    url = obj.get("url")
    if url not in ROUTES:
        raise LineError("invalid_request", f"url must be one of {', '.join(ROUTES)}, got {str(url)[:80]!r}",
                        custom_id)
    if "body" not in obj:
        raise LineError("invalid_request", "body is required: the request's JSON body", custom_id)
    return Entry(raw.number, custom_id, url, obj["body"])


def parse_body(entry: Entry) -> ApiRequest:
    """The body, as the HTTP route parses it; raises ValidationError with the HTTP API's code and param."""
    parsed = ROUTES[entry.url](entry.body)
    if parsed.stream:
        raise ValidationError("stream: a batch answers each request whole; leave stream out or set it to false",
                              param="stream", code="unsupported")
    return parsed


# ---- output lines -----------------------------------------------------------------


def _line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex[:24]}"


def error_line(number: int, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    """A line that is no request: no response, an error naming the input line."""
    return {"id": _line_id(), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message, "line": number}}


def response_line(custom_id: str, request_id: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {"id": _line_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def refusal_line(custom_id: str, request_id: str, code: str, message: str, param: str | None = None
                 ) -> dict[str, Any]:
    """What the HTTP API answers a refused request with: its status and error body."""
    return response_line(custom_id, request_id, api.error_status(code), api.error_body(code, message, param))


def answer_body(parsed: ApiRequest, model: str, prompt_tokens: int, finals: list[FinishEvent],
                logprobs: list[list[dict[str, Any]]], price_per_hour: float | None) -> dict[str, Any]:
    """The HTTP API's whole response: a chat.completion or text_completion, usage (and cost) included."""
    choices = [api.whole_choice(parsed, i, final, logprobs[i]) for i, final in enumerate(finals)]
    return api.response(parsed, model, choices, api.usage(prompt_tokens, finals, price_per_hour))
