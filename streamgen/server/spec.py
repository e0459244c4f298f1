"""What a client asks for, whatever the transport: one typed, validated value.

Every transport (the WebSocket protocol, the OpenAI HTTP API, batch files)
turns its untrusted input into a RequestSpec through the checks here, so a
field means the same thing and fails with the same message everywhere.
What needs the model (token counts, the context window, vocabulary bounds)
is checked later, once, by the engine's prepare_request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamgen.engine.params import SamplingParams
from streamgen.engine.request import TRUNCATE_CHOICES
from streamgen.engine.grammar import ConstraintSpec
from streamgen.engine.tokenizer import ChatMessage
from streamgen.engine.tools import Tool, ToolCall, ToolChoice
from streamgen.errors import ValidationError

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_CHOICES = 8  # n: sequences per request, each its own KV slot
CHAT = "chat"
TEXT_COMPLETION = "text_completion"


@dataclass(frozen=True, slots=True)
class RequestSpec:
    id: str
    prompt: str | None  # exactly one of prompt and messages
    messages: tuple[ChatMessage, ...] | None
    params: SamplingParams
    truncate: str = "refuse"  # TRUNCATE_CHOICES
    n: int = 1  # sequences sharing the prompt; seeded ones get seed, seed + 1, ...
    traceparent: str | None = None  # the caller's W3C trace context, if any
    user: str | None = None  # the caller's end-user id (OpenAI `user`), for the log
    constraint: ConstraintSpec | None = None  # structured output, or the tool-call grammar (server/structured.py)
    tools: tuple[Tool, ...] = ()  # described to the model
    tool_choice: ToolChoice | None = None  # None: the model may not call tools
    client_chosen_id: bool = False  # `id` is the client's (WebSocket): the server logs its own beside it

    @property
    def operation(self) -> str:
        """The GenAI operation name: chat for messages, text_completion for a plain prompt."""
        return CHAT if self.messages is not None else TEXT_COMPLETION

    def last_user_text(self) -> str:
        """What to log as 'the prompt': the prompt, or a chat's last user message."""
        if self.prompt is not None:
            return self.prompt
        users = [m.content for m in self.messages or () if m.role == "user"]
        return users[-1] if users else ""


def parse_json(text: str | bytes, what: str = "the request body") -> Any:
    """Untrusted JSON, strictly: NaN and Infinity are not JSON, and nesting too deep to parse is refused."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise ValidationError(f"{what} is not valid JSON: {str(exc)[:120]}", code="invalid_json") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def require_unicode(text: str, what: str, param: str | None = None) -> None:
    """JSON can carry lone surrogates, which are not text; the tokenizer would choke on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(f"{what} is not valid Unicode (it holds a lone surrogate)", param=param or what,
                              code="invalid_request") from None


def parse_prompt(raw: Any, param: str = "prompt") -> str:
    if not isinstance(raw, str) or not raw:
        raise ValidationError(f"{param} must be a non-empty string", param=param, code="invalid_request")
    require_unicode(raw, param)
    return raw


def parse_messages(raw: Any, *, exact_keys: bool = True, roles: Mapping[str, str] | None = None
                   ) -> tuple[ChatMessage, ...]:
    """Untrusted chat messages: a non-empty list of {role, content}; an assistant turn may carry `tool_calls`
    instead of content, and a `tool` turn answers one call (`tool_call_id`).

    content is a string or a list of text parts ({"type": "text", "text": ...}),
    joined. exact_keys refuses any other key (the WebSocket protocol); without
    it, others are ignored (the OpenAI API's `name`). roles maps extra role
    names onto ours (the OpenAI API's `developer` is a system message).
    """
    if not isinstance(raw, list) or not raw:
        raise ValidationError("messages must be a non-empty list of {role, content} objects", param="messages",
                              code="invalid_request")
    aliases = roles or {}
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, Mapping) or "role" not in m:
            raise ValidationError(f"{where} must be an object with 'role' and 'content'", param=where,
                                  code="invalid_request")
        role = aliases.get(m["role"], m["role"]) if isinstance(m["role"], str) else m["role"]
        if role not in CHAT_ROLES:
            allowed = ", ".join((*CHAT_ROLES, *aliases))
            raise ValidationError(f"{where}.role must be one of {allowed}, got {str(m['role'])[:40]!r}",
                                  param=where, code="invalid_request")
        allowed_keys = {"role", "content", *_ROLE_KEYS.get(role, ())}
        calls = _tool_calls(m.get("tool_calls"), where) if role == "assistant" else ()
        if ("content" not in m and not calls) or (exact_keys and set(m) - allowed_keys):
            raise ValidationError(f"{where} must be an object with {'exactly ' if exact_keys else ''}"
                                  f"{', '.join(repr(k) for k in sorted(allowed_keys))}", param=where,
                                  code="invalid_request")
        content = "" if calls and m.get("content") is None else _content(m.get("content"), where)
        call_id = m.get("tool_call_id")
        if role == "tool" and (not isinstance(call_id, str) or not call_id):
            raise ValidationError(f"{where} is a tool result: it needs tool_call_id, the call it answers",
                                  param=where, code="invalid_request")
        out.append(ChatMessage(role, content, calls, call_id if role == "tool" else None))
    return tuple(out)


_ROLE_KEYS = {"assistant": ("tool_calls",), "tool": ("tool_call_id",)}


def _tool_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant turn's calls, as the API returned them: [{id, type: function, function: {name, arguments}}]."""
    if raw is None or raw == []:
        return ()
    calls = []
    for j, c in enumerate(raw if isinstance(raw, list) else [None]):
        function = c.get("function") if isinstance(c, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        arguments = function.get("arguments") if isinstance(function, Mapping) else None
        if not isinstance(name, str) or not isinstance(arguments, str) or not isinstance(c.get("id", ""), str):
            raise ValidationError(f"{where}.tool_calls[{j}] must be {{id, type: function, function: {{name, "
                                  "arguments}}}} with arguments a JSON string", param=where, code="invalid_request")
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValidationError(f"{where}.tool_calls[{j}].function.arguments must be a JSON object's text",
                                  param=where, code="invalid_request")
        calls.append(ToolCall(c.get("id") or f"call_{j}", name, arguments))
    return tuple(calls)


def _content(raw: Any, where: str) -> str:
    """A message's text; errors name the message (`param` is messages[i])."""
    if isinstance(raw, list):
        texts = []
        for j, part in enumerate(raw):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                got = f"type {str(kind)[:40]!r}" if kind is not None else "something else"
                raise ValidationError(f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": "
                                      f"...}}; this server takes text only, got {got}", param=where,
                                      code="invalid_request")
            texts.append(part["text"])
        raw = "".join(texts)
    if not isinstance(raw, str):
        raise ValidationError(f"{where}.content must be a string or a list of text parts", param=where,
                              code="invalid_request")
    require_unicode(raw, f"{where}.content", param=where)
    return raw


def parse_truncate(raw: Any, chat: bool) -> str:
    if raw not in TRUNCATE_CHOICES:
        raise ValidationError(f"truncate must be one of {', '.join(TRUNCATE_CHOICES)}, got {str(raw)[:40]!r}",
                              param="truncate", code="invalid_request")
    if raw != "refuse" and not chat:
        raise ValidationError("truncate applies to chat messages; a plain prompt is never cut", param="truncate",
                              code="invalid_request")
    return raw


def parse_n(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= MAX_CHOICES:
        raise ValidationError(f"n must be an integer in [1, {MAX_CHOICES}], got {str(raw)[:40]}", param="n")
    return raw
