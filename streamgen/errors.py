"""Typed errors shared by every layer, and the one list of their stable codes.

Each error carries a stable `code` so that the CLI, the WebSocket protocol
and the OpenAI-compatible API report it without parsing messages. ERROR_CODES
says what each code means and which HTTP status answers it; the error tables
in docs/protocol.md and docs/openai.md are generated from it
(tests/record_docs.py), and tests/test_docs.py fails when the code raises a
code the list lacks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorCode:
    when: str  # what the client did or met
    status: int | None  # the HTTP status that answers it (an HTTP request, or a refused WebSocket handshake)
    where: str  # "request": an `error` message on the WebSocket and an error from the HTTP API;
    # "ws" / "http": that transport only; "handshake": a refused WebSocket handshake (and HTTP routes);
    # "cli": the command line


ERROR_CODES: dict[str, ErrorCode] = {
    "invalid_json": ErrorCode("the frame or body is not JSON (NaN and Infinity are not JSON)", 400, "request"),
    "invalid_message": ErrorCode("not an object, no `type`, bad or missing `id`, unknown field, bad `traceparent`",
                                 400, "ws"),
    "unknown_type": ErrorCode("`type` is not generate, cancel or ping", 400, "ws"),
    "invalid_request": ErrorCode("no prompt or messages, both, an empty prompt, bad messages, a `truncate` that does "
                                 "not apply", 400, "request"),
    "invalid_parameter": ErrorCode("a parameter out of range, of the wrong type, or unknown", 400, "request"),
    "context_length_exceeded": ErrorCode("the prompt, or prompt + `max_tokens`, does not fit the context window "
                                         "(for a chat, `truncate: \"oldest\"` drops old turns instead)", 400,
                                         "request"),
    "prompt_too_long": ErrorCode("the prompt has more tokens than `--max-prompt-tokens`", 400, "request"),
    "duplicate_id": ErrorCode("a request with this id is already in flight on this connection", 400, "ws"),
    "too_many_requests": ErrorCode("the per-connection limit of requests in flight is reached", 400, "ws"),
    "unknown_id": ErrorCode("`cancel` names no request in flight on this connection", 400, "ws"),
    "binary_not_supported": ErrorCode("a binary frame was sent", 400, "ws"),
    "rate_limited": ErrorCode("more than `--rate-limit` requests a minute from this client (its API key, else its "
                              "address), with `retry_after_ms`", 429, "request"),
    "overloaded": ErrorCode("`--max-queued` requests already wait for a slot; refused at once, with "
                            "`retry_after_ms`: when to try again, estimated from recent request times and the queue "
                            "ahead", 429, "request"),
    "engine_unavailable": ErrorCode("the model is still loading, or the engine has failed", 503, "request"),
    "shutting_down": ErrorCode("the server is draining after SIGTERM", 503, "request"),
    "internal": ErrorCode("the engine failed while running this request (details in the server log)", 500,
                          "request"),
    "invalid_constraint": ErrorCode("a response format, structured output or tools that cannot be used: a schema, "
                                    "regex or grammar that does not compile, is larger than "
                                    "`--max-constraint-bytes` or takes longer than `--max-compile-ms` to compile, "
                                    "allows no output, or a bad tools or tool_choice field", 400, "request"),
    "unsupported": ErrorCode("a field the server cannot honour (audio, images, the legacy functions, echo)", 400,
                             "http"),
    "payload_too_large": ErrorCode("the body is larger than `--max-message-bytes`", 413, "http"),
    "unauthorized": ErrorCode("the API key is missing or wrong", 401, "handshake"),
    "origin_not_allowed": ErrorCode("a browser page from an origin not in `--allowed-origins`", 403, "handshake"),
    "too_many_connections": ErrorCode("`--max-connections` sockets are open", 503, "handshake"),
    "model_not_found": ErrorCode("the model is not in the cache and pulling was not allowed", None, "cli"),
    "pull_failed": ErrorCode("a download, conversion, export or check failed", None, "cli"),
    "device_unavailable": ErrorCode("the device asked for cannot be used", None, "cli"),
    "invalid_setting": ErrorCode("a flag, environment variable or their combination is invalid", None, "cli"),
}


class StreamgenError(Exception):
    """Base class. `code` is stable; `message` says what to do."""

    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(StreamgenError):
    """A request or parameter is invalid. Raised only at the edge."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_parameter") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ModelNotFoundError(StreamgenError):
    code = "model_not_found"


class PullError(StreamgenError):
    code = "pull_failed"


class DeviceError(StreamgenError):
    code = "device_unavailable"


class ConfigError(StreamgenError):
    """A flag, environment variable or their combination is invalid."""

    code = "invalid_setting"
