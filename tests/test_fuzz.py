"""Fuzzing the edge: no input makes the message parser or the parameter
validation raise anything but their typed validation error."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamgen.engine.params import SamplingParams
from streamgen.errors import ValidationError
from streamgen.server.protocol import Cancel, Generate, Ping, ProtocolError, parse_client_message

json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
keys = st.sampled_from(["type", "id", "prompt", "messages", "params", "traceparent", "role", "content", "x"])
message_like = st.dictionaries(keys, json_value, max_size=6) | st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "cancel", "ping", "GENERATE", ""]), "id": json_value},
    optional={"prompt": json_value, "messages": json_value, "params": json_value, "traceparent": json_value},
)
param_names = st.sampled_from([
    "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "max_tokens", "stop", "stop_token_ids", "ignore_eos", "seed", "logprobs", "bogus",
])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace")))
def test_any_text_frame_parses_or_raises_protocol_error(text: str) -> None:
    try:
        assert isinstance(parse_client_message(text), (Generate, Cancel, Ping))
    except ProtocolError as exc:
        assert exc.code and exc.message


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message_like)
def test_any_json_object_parses_or_raises_protocol_error(message: dict) -> None:
    try:
        frame = json.dumps(message)
    except (ValueError, TypeError):
        return  # not encodable as JSON text (NaN is, and is tested as such)
    try:
        parsed = parse_client_message(frame)
    except ProtocolError as exc:
        assert exc.code in {"invalid_json", "invalid_message", "unknown_type", "invalid_request", "invalid_parameter"}
        return
    assert isinstance(parsed, (Generate, Cancel, Ping))


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(param_names, json_value, max_size=6))
def test_any_params_validate_or_raise_validation_error(raw: dict) -> None:
    try:
        params = SamplingParams.from_mapping(raw)
    except ValidationError as exc:
        assert exc.param is not None and exc.message
        return
    # What passes is within range.
    assert 0 <= params.temperature <= 10 and 0 < params.top_p <= 1 and params.top_k >= 0


def test_deeply_nested_json_is_a_typed_error() -> None:
    with pytest.raises(ProtocolError) as err:
        parse_client_message("[" * 100_000 + "]" * 100_000)
    assert err.value.code in ("invalid_json", "invalid_message")
