"""Tool calls: how a model is told about tools, the grammar that holds its calls to their schemas, and how
its output becomes calls again, streamed or whole.

One text format serves every model: Hermes's, which Qwen's chat templates
use natively,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, calls one after another. A template that renders tools
itself gets them as it expects (`tools`, assistant `tool_calls`, `tool`
messages); for a template that knows no tools (the default model's), the
tools and the format are described in the system turn, calls in the history
are written out in the format, and tool results come back as a user turn in
<tool_response> tags.

The grammar (Lark, with llguidance's inline %json) holds a call's JSON to one
of the tools' schemas, with "name" first and "arguments" matching that
tool's parameters, in fixed formatting. tool_choice "auto" allows an answer
or calls, so a call, once begun, never has malformed JSON; "required" and a
named function allow calls only. The parser reads the model's text back
into calls; fed the text token by token it emits the same calls in pieces
(the name once, then the arguments' raw text as it arrives), so streamed
calls join into exactly the whole ones.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})

    def as_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the arguments object's JSON text, exactly as the model wrote it


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """How the model may use the tools: mode "auto" (answer or call), "required" (call), "named" (call `name`).
    "none" never reaches here: the request then has no tools."""

    mode: str
    name: str | None = None
    parallel: bool = True  # several calls in one answer


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


# ---- telling the model -------------------------------------------------------------------------------------


def finish_reason(reason: str, called: bool) -> str:
    """A request's finish reason once its text is read back into calls: "tool_calls" when the model called and
    then ended its answer itself; an answer cut by max_tokens stays "length" even after a complete call, since
    the call after it may be cut in half (the complete calls are still given), as OpenAI does."""
    return "tool_calls" if called and reason == "stop" else reason


def system_prompt(tools: Sequence[Tool]) -> str:
    """The tools and the format, for a template that knows no tools: a system turn of their own."""
    listed = "\n".join(json.dumps(t.as_openai(), ensure_ascii=False) for t in tools)
    return ("You can call functions to help with the user's request. These are the functions:\n"
            f"{listed}\n"
            "To call one, reply with only this, one block per call:\n"
            f"{OPEN}{{\"name\": <function name>, \"arguments\": <the arguments as a JSON object>}}{CLOSE}\n"
            "Otherwise, answer the user normally.")


def call_text(calls: Sequence[ToolCall]) -> str:
    """Calls as the model writes them (an assistant turn in the history, for a template that knows no tools)."""
    return "\n".join(f'{OPEN}{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}{CLOSE}' for c in calls)


def result_text(content: str) -> str:
    """A tool's result as a user turn, for a template that knows no tool role."""
    return f"<tool_response>\n{content}\n</tool_response>"


# ---- holding the model to them -------------------------------------------------------------------------------


def grammar(tools: Sequence[Tool], choice: ToolChoice) -> str:
    """The Lark grammar of what the model may write."""
    chosen = [t for t in tools if choice.mode != "named" or t.name == choice.name]
    schema = {"anyOf": [_call_schema(t) for t in chosen], "x-guidance": _FORMAT}
    call = f'call: "{_lark(OPEN)}" %json {json.dumps(schema)} "{_lark(CLOSE)}"'
    calls = 'calls: call ("\\n" call)*' if choice.parallel and choice.mode != "named" else "calls: call"
    # An answer is any text that does not begin a call; it may not start with "<", which keeps the two apart.
    start = "start: answer | calls\nanswer: /[^<](.|\\n)*/" if choice.mode == "auto" else "start: calls"
    return f"{start}\n{calls}\n{call}\n"


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def _lark(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ---- reading calls back -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPiece:
    text: str


@dataclass(frozen=True, slots=True)
class CallPiece:
    """Part of call `index`: its id and name when it begins (name set), then fragments of its arguments."""

    index: int
    id: str
    name: str | None = None
    arguments: str = ""


class CallParser:
    """Turns the model's text, fed in pieces, into answer text and call pieces; `calls` holds the whole calls.

    Text that could still be the start of a call is held back until it is known not to be one."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []
        self.content = ""  # the answer's text, outside calls
        self._pending = ""  # text after the last call, or before any, not yet given out
        self._call: _OpenCall | None = None

    def feed(self, text: str) -> list[TextPiece | CallPiece]:
        out: list[TextPiece | CallPiece] = []
        self._pending += text
        while True:
            if self._call is None:
                at = self._pending.find(OPEN)
                if at < 0:
                    held = _partial_suffix(self._pending, OPEN)
                    self._text(self._pending[: len(self._pending) - held], out)
                    self._pending = self._pending[len(self._pending) - held:]
                    return out
                self._text(self._pending[:at], out)
                self._call = _OpenCall(len(self.calls), new_call_id())
                self._pending = self._pending[at + len(OPEN):]
            rest = self._call.feed(self._pending, out)
            if rest is None:  # the call is still open: everything went into it
                self._pending = ""
                return out
            self.calls.append(self._call.result())
            self._call, self._pending = None, rest

    def finish(self) -> list[TextPiece | CallPiece]:
        """The end of the text: what was held back is answer text (a call left open was cut and is dropped)."""
        out: list[TextPiece | CallPiece] = []
        if self._call is None:
            self._text(self._pending, out)
        self._pending, self._call = "", None
        return out

    def _text(self, text: str, out: list) -> None:
        if self.calls and not text.strip():
            return  # the newlines between calls are no answer
        if text:
            self.content += text
            out.append(TextPiece(text))


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_NAME = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")')


class _OpenCall:
    """One call's text after its opening tag, as it arrives: its name, then its arguments, then the tag that
    closes it. Read again from the start each time (a call is a few hundred characters)."""

    def __init__(self, index: int, call_id: str) -> None:
        self.index, self.id = index, call_id
        self.text = ""
        self.name: str | None = None
        self.arguments = ""  # the arguments' text given out so far

    def feed(self, text: str, out: list) -> str | None:
        """Take text; None while the call is open, else what follows its closing tag."""
        self.text += text
        if self.name is None and (m := _NAME.match(self.text)):
            self.name = json.loads(m.group(1))
            out.append(CallPiece(self.index, self.id, self.name))
        head = _HEAD.match(self.text)
        if head is None:
            return None
        end = _json_end(self.text, head.end())
        arguments = self.text[head.end(): end if end is not None else len(self.text)]
        if len(arguments) > len(self.arguments):
            out.append(CallPiece(self.index, self.id, None, arguments[len(self.arguments):]))
            self.arguments = arguments
        if end is None:
            return None
        close = self.text.find(CLOSE, end)
        if close < 0:
            return None
        rest = self.text[close + len(CLOSE):]
        self.text = self.text[: close]
        return rest

    def result(self) -> ToolCall:
        return ToolCall(self.id, self.name or "", self.arguments)


def _json_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at text[start] ends (one past it), or None if it has not ended yet."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of text could be the start of marker."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
