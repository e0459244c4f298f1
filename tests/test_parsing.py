"""The edge, without a model: a request's fields become one RequestSpec the same way from the WebSocket
protocol and from the OpenAI API, or fail with the same typed error naming the field."""

from __future__ import annotations

import json

import pytest

from streamgen.engine.tokenizer import ChatMessage
from streamgen.errors import ValidationError
from streamgen.server import openai_schema as api
from streamgen.server.protocol import Generate, ProtocolError, parse_client_message
from streamgen.server.spec import MAX_CHOICES, parse_messages, parse_n, parse_truncate

CHAT = [{"role": "user", "content": "Hi"}]


def _refused(call, *args, **kwargs) -> ValidationError:
    with pytest.raises(ValidationError) as err:
        call(*args, **kwargs)
    return err.value


def test_text_parts_are_joined_and_other_parts_refused_naming_the_message() -> None:
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "world"}]
    assert parse_messages([{"role": "user", "content": parts}]) == (ChatMessage("user", "Hello world"),)
    err = _refused(parse_messages, [CHAT[0], {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert err.param == "messages[1]" and "image_url" in err.message and "text only" in err.message


def test_the_websocket_wants_exactly_role_and_content_the_api_ignores_extra_keys() -> None:
    named = [{"role": "user", "content": "Hi", "name": "ada"}]
    assert _refused(parse_messages, named).param == "messages[0]"
    assert parse_messages(named, exact_keys=False) == (ChatMessage("user", "Hi"),)
    assert parse_messages([{"role": "developer", "content": "Be brief"}], exact_keys=False,
                          roles={"developer": "system"}) == (ChatMessage("system", "Be brief"),)
    assert "must be one of system, user, assistant, tool, got 'developer'" in _refused(
        parse_messages, [{"role": "developer", "content": "x"}]).message


def test_truncate_and_n() -> None:
    assert parse_truncate("oldest", chat=True) == "oldest"
    assert _refused(parse_truncate, "oldest", chat=False).param == "truncate"
    assert _refused(parse_truncate, "newest", chat=True).message.startswith("truncate must be one of refuse, oldest")
    assert parse_n(MAX_CHOICES) == MAX_CHOICES
    for bad in (0, MAX_CHOICES + 1, True, 1.5, "2"):
        assert _refused(parse_n, bad).param == "n"


def test_a_websocket_generate_becomes_a_spec() -> None:
    msg = parse_client_message(json.dumps({"type": "generate", "id": "r", "messages": CHAT, "truncate": "oldest",
                                           "params": {"temperature": 0, "logprobs": True, "top_logprobs": 2}}))
    assert isinstance(msg, Generate)
    spec = msg.spec
    assert spec.id == "r" and spec.operation == "chat" and spec.truncate == "oldest" and spec.n == 1
    assert spec.params.greedy and spec.params.top_logprobs == 2
    with pytest.raises(ProtocolError) as err:
        parse_client_message(json.dumps({"type": "generate", "id": "p", "prompt": "x", "truncate": "oldest"}))
    assert err.value.param == "truncate" and err.value.request_id == "p"


def test_a_chat_body_becomes_the_same_spec() -> None:
    parsed = api.chat_spec({"model": "anything", "messages": CHAT, "max_completion_tokens": 7, "max_tokens": 99,
                            "temperature": 0, "stop": "x", "seed": 3, "n": 2, "top_k": 5, "truncate": "oldest",
                            "logprobs": True, "top_logprobs": 4, "logit_bias": {"10": -100},
                            "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
                            "metadata": {"ignored": True}, "frequency_penalty": None})
    spec = parsed.spec
    assert parsed.kind == "chat" and parsed.stream and parsed.include_usage and spec.id.startswith("chatcmpl-")
    assert spec.messages == (ChatMessage("user", "Hi"),) and spec.prompt is None and spec.n == 2
    p = spec.params
    assert p.max_tokens == 7, "max_completion_tokens wins over max_tokens"
    assert (p.greedy, p.stop, p.seed, p.top_k, p.top_logprobs, p.logit_bias) == (True, ("x",), 3, 5, 4, ((10, -100.0),))
    assert spec.truncate == "oldest" and spec.user == "u1" and p.frequency_penalty == 0.0, "null means not given"


def test_a_completion_body_maps_the_older_logprobs_count() -> None:
    parsed = api.completion_spec({"prompt": ["Once upon"], "logprobs": 3, "max_tokens": 5})
    assert parsed.kind == "completion" and parsed.spec.prompt == "Once upon" and parsed.spec.id.startswith("cmpl-")
    assert parsed.spec.params.logprobs and parsed.spec.params.top_logprobs == 3


@pytest.mark.parametrize("body,param,code", [
    ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools[0]", "invalid_constraint"),
    ({"messages": CHAT, "response_format": {"type": "xml"}}, "response_format", "invalid_constraint"),
    ({"messages": CHAT, "functions": [{"name": "f"}]}, "functions", "unsupported"),
    ({"messages": CHAT, "tool_choice": "required"}, "tool_choice", "invalid_constraint"),
    ({"messages": CHAT, "structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs",
     "invalid_constraint"),
    ({"messages": CHAT, "modalities": ["text", "audio"]}, "modalities", "unsupported"),
    ({"messages": CHAT, "top_p": 0}, "top_p", "invalid_parameter"),
    ({"messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens", "invalid_parameter"),
    ({"messages": CHAT, "stream_options": "yes"}, "stream_options", "invalid_parameter"),
    ({"messages": "Hi"}, "messages", "invalid_request"),
    ({}, "messages", "invalid_request"),
])
def test_chat_bodies_that_are_refused_name_the_field(body: dict, param: str, code: str) -> None:
    err = _refused(api.chat_spec, body)
    assert (err.param, err.code) == (param, code)
    assert api.error_status(code) == 400


def test_a_supported_empty_tools_list_and_text_format_are_fine() -> None:
    parsed = api.chat_spec({"messages": CHAT, "tools": [], "response_format": {"type": "text"}})
    assert parsed.spec.messages == (ChatMessage("user", "Hi"),)


def test_errors_name_the_field_the_client_sent() -> None:
    parsed = api.chat_spec({"messages": CHAT, "max_completion_tokens": 5})
    assert parsed.client_param("max_tokens", "max_tokens must be at most 9") == (
        "max_completion_tokens", "max_completion_tokens must be at most 9")
    assert parsed.client_param("prompt", "too long") == ("prompt", "too long")
