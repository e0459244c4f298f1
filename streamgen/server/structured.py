"""Structured output and tools, as a client asks for them: one typed value for every transport.

The fields are the OpenAI API's, and the same at the top level of a WebSocket
`generate` and in batch request lines:
- `response_format`: {"type": "text"}, {"type": "json_object"}, or
  {"type": "json_schema", "json_schema": {"name", "schema", "strict"}};
- `structured_outputs` (vLLM's extension, same shape): exactly one of
  {"json": schema}, {"regex": "..."}, {"choice": ["a", "b"]}, {"grammar": "<Lark>"},
  {"json_object": true};
- `tools` (functions with JSON-schema parameters), `tool_choice` ("none",
  "auto", "required" or {"type": "function", "function": {"name": ...}}) and
  `parallel_tool_calls`.
Each becomes a ConstraintSpec the engine compiles against the model's
tokenizer (engine/grammar.py); a refusal names the field. Tools become the
tool-call grammar of engine/tools.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streamgen.engine.grammar import ConstraintSpec
from streamgen.engine.tools import Tool, ToolChoice, grammar
from streamgen.errors import ValidationError
from streamgen.server.spec import parse_json

MAX_TOOLS = 64
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
FIELDS = ("response_format", "structured_outputs", "tools", "tool_choice", "parallel_tool_calls")


@dataclass(frozen=True, slots=True)
class Structured:
    constraint: ConstraintSpec | None = None
    tools: tuple[Tool, ...] = ()  # described to the model (rendered into the prompt)
    tool_choice: ToolChoice | None = None  # None: the model may not call tools


NONE = Structured()


def parse_structured(body: Mapping[str, Any]) -> Structured:
    """The structured-output and tool fields of a request body (absent or null fields are not given)."""
    constraint = _response_format(body.get("response_format"))
    extra = _structured_outputs(body.get("structured_outputs"))
    if constraint is not None and extra is not None:
        raise _invalid("structured_outputs", "give either response_format or structured_outputs, not both")
    constraint = constraint or extra
    tools = _tools(body.get("tools"))
    choice = _tool_choice(body.get("tool_choice"), tools, body.get("parallel_tool_calls"))
    if choice is None:
        return Structured(constraint)  # tool_choice "none": no calls, and the tools are not described either
    if constraint is not None:
        raise _invalid("response_format", "a response format cannot be combined with tools the model may call; "
                       "send tool_choice \"none\", or leave one of them out")
    return Structured(ConstraintSpec("tools", grammar(tools, choice), "tools"), tools, choice)


def _invalid(param: str, message: str) -> ValidationError:
    return ValidationError(f"{param}: {message}", param=param, code="invalid_constraint")


def _response_format(raw: Any) -> ConstraintSpec | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object", {"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise _invalid("response_format", 'json_schema must be an object with a "schema" object')
        schema = dict(spec.get("schema") or {})
        if not spec.get("strict"):
            # Not strict: keywords llguidance does not enforce are ignored rather than refused.
            schema["x-guidance"] = {**schema.get("x-guidance", {}), "lenient": True}
        return ConstraintSpec("json_schema", schema, "response_format")
    raise _invalid("response_format", f'type must be "text", "json_object" or "json_schema", got {str(kind)[:40]!r}')


def _structured_outputs(raw: Any) -> ConstraintSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise _invalid("structured_outputs", "must be an object")
    given = {k: v for k, v in raw.items() if v is not None and v is not False}
    if len(given) != 1 or next(iter(given)) not in ("json", "regex", "choice", "grammar", "json_object"):
        raise _invalid("structured_outputs", "must hold exactly one of json, regex, choice, grammar, json_object")
    key, value = next(iter(given.items()))
    param = f"structured_outputs.{key}"
    if key == "json_object":
        return ConstraintSpec("json_object", {"type": "object"}, param)
    if key == "json":
        if isinstance(value, str):
            value = parse_json(value, param)
        if not isinstance(value, Mapping):
            raise _invalid(param, "must be a JSON schema (an object, or its JSON text)")
        return ConstraintSpec("json_schema", dict(value), param)
    if key == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise _invalid(param, "must be a non-empty list of non-empty strings")
        return ConstraintSpec("choice", tuple(value), param)
    if not isinstance(value, str) or not value:
        raise _invalid(param, "must be a non-empty string")
    return ConstraintSpec("regex" if key == "regex" else "grammar", value, param)


def _tools(raw: Any) -> tuple[Tool, ...]:
    if raw is None or raw == []:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise _invalid("tools", f"must be a list of at most {MAX_TOOLS} functions")
    tools = []
    for i, item in enumerate(raw):
        function = item.get("function") if isinstance(item, Mapping) else None
        if not isinstance(item, Mapping) or item.get("type") != "function" or not isinstance(function, Mapping):
            raise _invalid(f"tools[{i}]", 'must be {"type": "function", "function": {"name", "parameters"}}')
        name, parameters = function.get("name"), function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _invalid(f"tools[{i}]", "function.name must be 1-64 characters of a-z, A-Z, 0-9, _ and -")
        if not isinstance(parameters, Mapping):
            raise _invalid(f"tools[{i}]", "function.parameters must be a JSON schema object")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise _invalid(f"tools[{i}]", "function.description must be a string")
        tools.append(Tool(name, description, dict(parameters)))
    if len({t.name for t in tools}) != len(tools):
        raise _invalid("tools", "function names must be unique")
    return tuple(tools)


def _tool_choice(raw: Any, tools: tuple[Tool, ...], parallel: Any) -> ToolChoice | None:
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid("parallel_tool_calls", "must be true or false")
    parallel = True if parallel is None else parallel
    if raw is None:
        raw = "auto" if tools else "none"
    if raw == "none":
        return None
    if not tools:
        raise _invalid("tool_choice", "needs tools")
    if raw in ("auto", "required"):
        return ToolChoice(raw, parallel=parallel)
    function = raw.get("function") if isinstance(raw, Mapping) and raw.get("type") == "function" else None
    name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise _invalid("tool_choice", 'must be "none", "auto", "required" or {"type": "function", "function": '
                                      '{"name": ...}}')
    if name not in {t.name for t in tools}:
        raise _invalid("tool_choice", f"names {name[:64]!r}, which is not among the tools")
    return ToolChoice("named", name, parallel=False)
