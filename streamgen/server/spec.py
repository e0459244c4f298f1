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
from streamgen.engine.tokenizer import ChatMessage
from streamgen.errors import ValidationError

CHAT_ROLES = ("system", "user", "assistant")
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
    """Untrusted chat messages: a non-empty list of {role, content}.

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
        if not isinstance(m, Mapping) or not {"role", "content"} <= set(m) or (exact_keys and len(m) != 2):
            raise ValidationError(f"{where} must be an object with {'exactly ' if exact_keys else ''}"
                                  "'role' and 'content'", param=where, code="invalid_request")
        role = aliases.get(m["role"], m["role"]) if isinstance(m["role"], str) else m["role"]
        if role not in CHAT_ROLES:
            allowed = ", ".join((*CHAT_ROLES, *aliases))
            raise ValidationError(f"{where}.role must be one of {allowed}, got {str(m['role'])[:40]!r}",
                                  param=where, code="invalid_request")
        out.append(ChatMessage(role, _content(m["content"], where)))
    return tuple(out)


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
