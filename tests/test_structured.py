"""Structured output and tool calls: the grammars, the call format read back, the official `openai` SDK against
a real server on the real default model, and hostile constraints against a real server on the tiny model."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
import websockets

from streamgen.engine.grammar import ConstraintSpec, Grammars, GrammarLimits
from streamgen.engine.tools import CallParser, CallPiece, TextPiece, Tool, ToolCall, ToolChoice, call_text, grammar
from streamgen.errors import ValidationError

from tiny import build_tiny_tokenizer

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 1000},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 1000}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string", "enum": ["Paris", "London", "Rome"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}


# ---- the call format, read back (no model) ------------------------------------------------------------------


def test_calls_fed_a_character_at_a_time_join_into_the_whole_calls() -> None:
    calls = [ToolCall("a", "get_weather", '{"city": "Pa\\"ris {x}", "tags": [1, {"b": []}]}'), ToolCall("b", "add", "{}")]
    text = "Let me check.\n" + call_text(calls)
    whole = CallParser()
    whole.feed(text)
    whole.finish()
    assert [(c.name, c.arguments) for c in whole.calls] == [(c.name, c.arguments) for c in calls]
    assert whole.content == "Let me check.\n"
    for step in (1, 2, 5, 13):
        parser, pieces = CallParser(), []
        for i in range(0, len(text), step):
            pieces += parser.feed(text[i: i + step])
        pieces += parser.finish()
        names = {p.index: p.name for p in pieces if isinstance(p, CallPiece) and p.name}
        arguments = {}
        for p in pieces:
            if isinstance(p, CallPiece):
                arguments[p.index] = arguments.get(p.index, "") + p.arguments
        assert names == {0: "get_weather", 1: "add"}
        assert [arguments[0], arguments[1]] == [c.arguments for c in whole.calls]
        assert "".join(p.text for p in pieces if isinstance(p, TextPiece)) == whole.content


def test_text_that_only_looks_like_a_call_stays_text_and_a_cut_call_is_dropped() -> None:
    parser = CallParser()
    pieces = parser.feed("a <tool_ca") + parser.feed("t is not a call") + parser.finish()
    assert "".join(p.text for p in pieces) == "a <tool_cat is not a call" and parser.calls == []
    cut = CallParser()
    cut.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1')
    cut.finish()
    assert cut.calls == [] and cut.content == ""


@pytest.fixture(scope="module")
def grammars() -> Grammars:
    tok = build_tiny_tokenizer()
    return Grammars(tok.to_str(), tok.get_vocab_size(), frozenset({2}))


def test_each_kind_compiles_and_is_cached_by_content(grammars: Grammars) -> None:
    specs = [ConstraintSpec("json_schema", PERSON, "response_format"),
             ConstraintSpec("json_object", {"type": "object"}, "response_format"),
             ConstraintSpec("regex", "[0-9]{3}-[0-9]{4}", "structured_outputs.regex"),
             ConstraintSpec("choice", ("yes", "no"), "structured_outputs.choice"),
             ConstraintSpec("grammar", 'start: "a" | "b" "c"', "structured_outputs.grammar"),
             ConstraintSpec("tools", grammar([Tool("add", "", ADD["function"]["parameters"])], ToolChoice("required")),
                            "tools")]
    for spec in specs:
        first, again = grammars.compile(spec), grammars.compile(spec)
        assert not first.cached and again.cached and again.grammar == first.grammar, spec.kind


@pytest.mark.parametrize("spec,why", [
    (ConstraintSpec("regex", "(a", "structured_outputs.regex"), "regex"),
    (ConstraintSpec("json_schema", {"type": "string", "enum": []}, "response_format"), "Unsatisfiable"),
    (ConstraintSpec("json_schema", {"$ref": "#/nowhere"}, "response_format"), "nowhere"),
    (ConstraintSpec("json_schema", {"type": "object", "properties": {"a": {"not": {}}}}, "response_format"),
     "not"),
    (ConstraintSpec("grammar", "start: x", "structured_outputs.grammar"), ""),
], ids=["bad regex", "allows nothing", "dangling ref", "unsupported keyword", "bad grammar"])
def test_a_constraint_that_cannot_be_used_is_refused_naming_its_field(grammars: Grammars, spec, why: str) -> None:
    with pytest.raises(ValidationError) as refused:
        grammars.compile(spec)
    assert refused.value.param == spec.param and refused.value.code == "invalid_constraint"
    assert why in refused.value.message


def test_size_depth_and_work_are_bounded(grammars: Grammars) -> None:
    huge = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(2000)}}
    with pytest.raises(ValidationError, match="bytes"):
        grammars.compile(ConstraintSpec("json_schema", huge, "response_format"))
    deep: dict = {"type": "integer"}
    for _ in range(100):
        deep = {"type": "array", "items": deep}
    with pytest.raises(ValidationError, match="deeper"):
        grammars.compile(ConstraintSpec("json_schema", deep, "response_format"))
    # Slower to compile than the limit (here any compile is): refused, and remembered, so a second request with the
    # same grammar is refused without compiling it again.
    slow = ConstraintSpec("choice", tuple(f"option {i}" for i in range(500)), "structured_outputs.choice")
    for _ in range(2):
        with pytest.raises(ValidationError, match="to compile") as refused:
            grammars.compile(slow, GrammarLimits(max_compile_ms=0.001))
        assert refused.value.param == "structured_outputs.choice"


# ---- the official SDK against a real server on the real default model ----------------------------------------


@pytest.fixture(scope="module")
def sdk(real_server):
    with openai.OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0) as client:
        yield client


def _streamed(sdk, **kwargs) -> tuple[str, dict[int, dict], str | None]:
    content, calls, reason = "", {}, None
    for chunk in sdk.chat.completions.create(model=MODEL, stream=True, **kwargs):
        choice = chunk.choices[0] if chunk.choices else None
        if choice is None:
            continue
        content += choice.delta.content or ""
        for piece in choice.delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] = piece.function.name or call["name"]
            call["arguments"] += piece.function.arguments or ""
        reason = choice.finish_reason or reason
    return content, calls, reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_answers_parse_and_validate(sdk, stream: bool) -> None:
    kwargs = {"messages": [{"role": "user", "content": "Make up a person who lives in Europe."}], "max_tokens": 80,
              "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                          "strict": True}}}
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        if stream:
            text, _, reason = _streamed(sdk, seed=seed, temperature=temperature, **kwargs)
        else:
            reply = sdk.chat.completions.create(model=MODEL, seed=seed, temperature=temperature, **kwargs)
            text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_an_object(sdk) -> None:
    reply = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Describe a cat in JSON."}],
                                        response_format={"type": "json_object"}, max_tokens=120, temperature=0)
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert reply.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}],
                         ids=["required", "named"])
def test_forced_calls_validate_and_stream_into_the_same_calls(sdk, tool_choice) -> None:
    kwargs = {"messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "max_tokens": 120, "temperature": 0}
    whole = sdk.chat.completions.create(model=MODEL, **kwargs)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in choice.message.tool_calls] == ["add"], "a named choice makes one call"
    content, streamed, reason = _streamed(sdk, **kwargs)
    assert reason == "tool_calls" and content == ""
    assert sorted(streamed) == list(range(len(streamed))), "stable indexes 0, 1, ..."
    assert [(c["name"], c["arguments"]) for _, c in sorted(streamed.items())] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert all(c["id"] and c["id"].startswith("call_") for c in streamed.values())


def test_parallel_calls_have_their_own_indexes_and_can_be_turned_off(sdk) -> None:
    ask = [{"role": "user", "content": "Get the weather in Paris, in London and in Rome, in celsius."}]
    reply = sdk.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required",
                                        max_tokens=200, temperature=0)
    calls = reply.choices[0].message.tool_calls
    assert calls and len({c.id for c in calls}) == len(calls)
    single = sdk.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=200, temperature=0)
    assert len(single.choices[0].message.tool_calls) == 1


def test_auto_answers_or_calls_and_a_call_is_never_malformed(sdk) -> None:
    for seed in range(3):
        reply = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=1.0,
                                            seed=seed)
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
        else:
            assert choice.finish_reason in ("stop", "length") and choice.message.content


def test_a_tool_result_turn_is_answered(sdk) -> None:
    first = sdk.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                        max_tokens=120, temperature=0).choices[0].message
    call = first.tool_calls[0]
    history = [*ASK, first.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    reply = sdk.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                        max_tokens=40, temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].message.tool_calls is None


def test_a_schema_that_cannot_be_used_is_a_400_naming_the_field(sdk) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {"type": "nonsense"}}})
    assert refused.value.body["code"] == "invalid_constraint" and refused.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8,
                                    extra_body={"structured_outputs": {"regex": "(unclosed"}})
    assert refused.value.body["param"] == "structured_outputs.regex"


def test_the_websocket_streams_the_same_calls_as_tool_call_messages(real_server, sdk) -> None:
    kwargs = {"tools": TOOLS, "tool_choice": "required"}
    whole = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=120, temperature=0, **kwargs)

    async def ws() -> tuple[list[dict], dict]:
        async with websockets.connect(real_server.ws_url) as sock:
            await sock.send(json.dumps({"type": "generate", "id": "t", "messages": ASK, **kwargs,
                                        "params": {"max_tokens": 120, "temperature": 0}}))
            pieces = []
            while (msg := json.loads(await sock.recv()))["type"] not in ("done", "error"):
                if msg["type"] == "tool_call":
                    pieces.append(msg)
            return pieces, msg

    pieces, done = asyncio.run(ws())
    assert done["finish_reason"] == "tool_calls"
    joined: dict[int, str] = {}
    for p in pieces:
        joined[p["index"]] = joined.get(p["index"], "") + p["arguments"]
    expected = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in done["tool_calls"]] == expected
    assert [joined[i] for i in sorted(joined)] == [a for _, a in expected]


def test_an_answer_cut_by_max_tokens_after_its_calls_finishes_with_length(sdk) -> None:
    """Asked this, the small model calls get_weather again and again while parallel calls are allowed, until
    max_tokens cuts it: the finish reason says so ("length", as OpenAI gives it), and the complete calls are
    given, the cut one not. With parallel_tool_calls off the grammar ends the answer after one call."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    cut = sdk.chat.completions.create(model=MODEL, messages=ask, max_tokens=80, temperature=0,
                                      tools=[WEATHER], tool_choice="required")
    calls = cut.choices[0].message.tool_calls
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 80
    assert calls and all(json.loads(c.function.arguments)["city"] == "Paris" for c in calls)
    one = sdk.chat.completions.create(model=MODEL, messages=ask, max_tokens=80, temperature=0, tools=[WEATHER],
                                      tool_choice="required", parallel_tool_calls=False)
    assert one.choices[0].finish_reason == "tool_calls" and one.usage.completion_tokens < 80
    assert [(c.function.name, c.function.arguments) for c in one.choices[0].message.tool_calls] == [
        (calls[0].function.name, calls[0].function.arguments)]


# ---- hostile constraints against a real server (tiny model) ------------------------------------------------------


def test_hostile_constraints_are_refused_or_bounded_and_everyone_else_is_served(tiny_server) -> None:
    server = tiny_server("--max-message-bytes", "262144")
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    hostile = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": deep}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "huge", "schema": {
            "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(3000)}}}}},
        {"structured_outputs": {"regex": "(a|b)*a(a|b){60}"}},
        {"structured_outputs": {"regex": "((a+)+)+b"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "nothing", "strict": True,
                                                                    "schema": {"enum": []}}}},
        {"structured_outputs": {"grammar": "start: start"}},
    ]

    async def one(i: int, extra: dict) -> dict:
        async with websockets.connect(server.ws_url, max_size=None) as sock:
            await sock.send(json.dumps({"type": "generate", "id": f"h{i}", "prompt": "Hello", **extra,
                                        "params": {"max_tokens": 8, "temperature": 0}}))
            while (msg := json.loads(await asyncio.wait_for(sock.recv(), 30)))["type"] not in ("done", "error"):
                pass
            return msg

    async def run() -> list[dict]:
        plain = {"params": {"max_tokens": 8}}
        return await asyncio.gather(*(one(i, e) for i, e in enumerate([*hostile, plain, plain])))

    results = asyncio.run(run())
    for msg in results[: len(hostile)]:
        # Refused with the constraint's code, or (a pathological regex that still compiles) answered.
        assert msg["type"] == "done" or (msg["code"], msg["param"]) in {
            ("invalid_constraint", "response_format"), ("invalid_constraint", "structured_outputs.regex"),
            ("invalid_constraint", "structured_outputs.grammar")}, msg
    assert results[0]["type"] == results[1]["type"] == results[4]["type"] == "error"
    assert all(msg["type"] == "done" for msg in results[len(hostile):]), "everyone else was served"
    assert server.stats()["active_requests"] == 0


def test_bench_structured_runs_end_to_end_and_reports_consistent_figures(tiny_hf_dir, tiny_model_dir, tiny_cache,
                                                                         tmp_path) -> None:
    """A smoke run of `streamgen bench structured` on the tiny model, whose answers are cut short (so validity is
    not judged here): the report's shape, and figures consistent with one another."""
    from streamgen.bench.structured import corpus
    from streamgen.cli import main

    out = tmp_path / "structured.json"
    assert main(["bench", "structured", "--model", str(tiny_hf_dir), "--home", str(tiny_cache.home), "--quantize",
                 "none", "--schemas", "3", "--seeds", "1", "--max-tokens", "12", "--levels", "1,2", "--rounds", "1",
                 "--requests", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(corpus()) >= 50 and report["schemas"] == 3
    assert 0 <= report["compile"]["p50_ms"] <= report["compile"]["p99_ms"] <= report["compile"]["max_ms"]
    assert report["mask"]["steps"] > 0 and 0 <= report["mask"]["p50_ms"] <= report["mask"]["p99_ms"]
    assert set(report["validity"]) == {"streamgen"}
    assert list(report["validity"]["streamgen"]) == ["greedy", "t1-seed0"]
    for v in report["validity"]["streamgen"].values():
        assert v["valid"] + len(v["cut"]) + len(v["invalid"]) == v["total"] == 3
    assert report["validity"]["streamgen"]["greedy"]["cut"], "12 tokens cut the tiny model's answers"
    assert [row["concurrency"] for row in report["decode"]] == [1, 2]
    for row in report["decode"]:
        assert row["constrained_vs_free"] == pytest.approx(row["streamgen constrained"] / row["streamgen free"],
                                                           abs=1e-3)


def test_every_corpus_schema_compiles_and_is_a_valid_json_schema(grammars: Grammars) -> None:
    from streamgen.bench.structured import corpus

    for entry in corpus():
        jsonschema.Draft202012Validator.check_schema(entry["schema"])
        grammars.compile(ConstraintSpec("json_schema", entry["schema"], "response_format"))
