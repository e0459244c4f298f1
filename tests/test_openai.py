"""The OpenAI-compatible API through the official `openai` SDK, against real `streamgen serve` processes
(tiny model; one test on the real default model at the end)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator

import httpx
import openai
import pytest
import websockets

from conftest import ServerProcess
from helpers import idle, wait_until

MODEL = "any-name"  # whatever a request names, the loaded model answers and the response names it
CHAT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def server(tiny_server) -> Iterator[ServerProcess]:
    s = tiny_server("--max-message-bytes", "16384")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="anything", max_retries=0) as sdk:
        yield sdk


def test_models_list_is_openais_shape(client, server) -> None:
    (model,) = client.models.list().data
    assert model.object == "model" and model.owned_by == "streamgen" and model.created > 1_700_000_000
    assert model.id.endswith("tiny-hf0")


def test_chat_not_streamed(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model != MODEL
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_streamed_equals_not_streamed_and_carries_usage(client) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 5, "one chunk per token"


def test_completions_streamed_and_not(client) -> None:
    r = client.completions.create(model=MODEL, prompt="Hello world", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Hello world", max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert streamed == r.choices[0].text


def test_async_client_streams_concurrently(server) -> None:
    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)

        async def one(prompt: str) -> str:
            stream = await aclient.chat.completions.create(model=MODEL, temperature=0, max_tokens=10, stream=True,
                                                           messages=[{"role": "user", "content": prompt}])
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one(p) for p in ("Hello", "Paris is", "Code:")))
        finally:
            await aclient.close()

    texts = asyncio.run(run())
    assert all(isinstance(t, str) for t in texts) and len(set(texts)) == 3


def test_n_choices_stop_seed_and_logprobs(client) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=1.0, seed=11, n=2,
                                       extra_body={"ignore_eos": True})
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=1.0, seed=11, n=2,
                                           extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices], "seeded: reproducible"
    assert r.choices[0].message.content != r.choices[1].message.content, "choices get seeds seed and seed + 1"
    assert r.usage.completion_tokens == 40

    greedy = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].message.content
    stop = greedy[5:9]
    cut = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == greedy[: greedy.index(stop)]

    lp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                        top_logprobs=3, extra_body={"ignore_eos": True}).choices[0]
    content = lp.logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == lp.message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.top_logprobs[0].token == token.token, "greedy: the top one"
        assert token.logprob <= 0 and bytes(token.bytes).decode("utf-8", "replace") == token.token


def test_invalid_parameters_raise_bad_request_naming_the_field(client) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, top_p=1.5)
    body = err.value.body
    assert err.value.status_code == 400 and body["param"] == "top_p" and "(0, 1]" in body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT,
                                       tools=[{"type": "function", "function": {"name": "f g", "parameters": {}}}])
    assert err.value.body["param"] == "tools[0]" and err.value.body["code"] == "invalid_constraint"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=10_000)
    assert err.value.body["param"] == "max_completion_tokens"
    ok = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, metadata={"unknown": "ignored"},
                                        extra_body={"some_new_field": 1})
    assert ok.choices[0].message.content is not None, "unknown fields are ignored"


HOSTILE = [
    ("malformed JSON", b'{"model": "x", "messages": [', 400, "invalid_json", None),
    ("NaN", b'{"model": "x", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400,
     "invalid_json", None),
    ("body not an object", b"[1, 2]", 400, "invalid_request", None),
    ("no messages", b'{"model": "x"}', 400, "invalid_request", "messages"),
    ("messages not a list", b'{"messages": "hi"}', 400, "invalid_request", "messages"),
    ("wrong role", b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "invalid_request", "messages[0]"),
    ("image part", b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}',
     400, "invalid_request", "messages[0]"),
    ("number content", b'{"messages": [{"role": "user", "content": 5}]}', 400, "invalid_request", "messages[0]"),
    ("temperature string", b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400,
     "invalid_parameter", "temperature"),
    ("n too large", b'{"messages": [{"role": "user", "content": "x"}], "n": 99}', 400, "invalid_parameter", "n"),
    ("stream not bool", b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400,
     "invalid_parameter", "stream"),
    ("json schema without a schema", b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": '
     b'"json_schema"}}', 400, "invalid_constraint", "response_format"),
    ("audio", b'{"messages": [{"role": "user", "content": "x"}], "audio": {"voice": "x"}}', 400, "unsupported",
     "audio"),
    ("huge body", b'{"messages": [{"role": "user", "content": "' + b"x" * 20000 + b'"}]}', 413,
     "payload_too_large", None),
    ("lone surrogate", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "invalid_request",
     "messages[0]"),
    ("prompt too long for the context", b'{"messages": [{"role": "user", "content": "' + b"word " * 1000 + b'"}]}',
     400, "context_length_exceeded", "prompt"),
    ("token-id prompt", b'{"prompt": [[1, 2, 3]]}', 400, "invalid_request", "prompt"),
    ("echo", b'{"prompt": "x", "echo": true}', 400, "unsupported", "echo"),
    ("logprobs 9 (legacy)", b'{"prompt": "x", "logprobs": 9}', 400, "invalid_parameter", "logprobs"),
]


@pytest.mark.parametrize("name,body,status,code,param", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_get_a_typed_4xx(server, name, body, status, code, param) -> None:
    path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
    r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["param"] == param and error["message"] and error["type"]


def test_a_healthy_client_is_served_while_hostile_bodies_arrive(server, client) -> None:
    async def hostile() -> None:
        async with httpx.AsyncClient(timeout=10) as h:
            for _ in range(3):
                for _, body, *_ in HOSTILE:
                    await h.post(server.url + "/v1/chat/completions", content=body)

    async def healthy() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        try:
            return [(await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0,
                                                           extra_body={"ignore_eos": True})).choices[0].message.content
                    for _ in range(5)]
        finally:
            await aclient.close()

    async def run():
        return (await asyncio.gather(hostile(), healthy()))[1]

    answers = asyncio.run(run())
    assert len(set(answers)) == 1 and answers[0], "the same greedy answer every time"
    assert server.proc.poll() is None


def _cancelled_total(server) -> float:
    """streamgen.requests{finish_reason=cancelled} from /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    found = re.search(r'^streamgen_requests_total\{[^}]*finish_reason="cancelled"[^}]*\} (\S+)$', text, flags=re.M)
    return float(found.group(1)) if found else 0.0


def test_a_client_that_disconnects_mid_stream_frees_its_request(server) -> None:
    # As many tokens as the tiny model's context leaves, so the stream is still running when the client goes
    # (the cancelled count below proves it was: a stream that had finished would count as length).
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 220, "ignore_eos": True, "stream": True}
    before = _cancelled_total(server)
    with httpx.Client(timeout=10) as h, h.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
    wait_until(lambda: idle(server.stats()), 5, "the abandoned stream ending")
    assert _cancelled_total(server) == before + 1, "the request ended as cancelled, not by running to its end"


@pytest.mark.integration
def test_a_client_that_disconnects_before_a_whole_response_frees_its_request(real_server) -> None:
    # The real model: 400 tokens take seconds, so the client leaves long before the answer is whole.
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(real_server.url + "/v1/chat/completions", json=body, timeout=0.5)
    wait_until(lambda: not real_server.stats()["active_requests"], 5, "the abandoned request ending")


def test_greedy_text_over_http_equals_the_websocket(server, client) -> None:
    async def ws_text() -> str:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "w", "messages": CHAT,
                                      "params": {"temperature": 0, "max_tokens": 24, "ignore_eos": True}}))
            while (msg := json.loads(await ws.recv()))["type"] != "done":
                pass
            return msg["text"]

    http = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].message.content
    assert http == asyncio.run(ws_text())


def test_429_is_retried_by_the_sdk_itself(tiny_server) -> None:
    # 60 a minute: the bucket holds 60 and refills one a second, so the request right after the refusal is
    # refused too (a refill every 100 ms let a slow moment slip one through) and the SDK's retry waits ~1 s.
    limited = tiny_server("--rate-limit", "60")
    statuses: list[int] = []
    opened: list[openai.OpenAI] = []
    try:
        hooks = {"response": [lambda response: statuses.append(response.status_code)]}
        sdk = openai.OpenAI(base_url=limited.url + "/v1", api_key="x", max_retries=3,
                            http_client=httpx.Client(event_hooks=hooks))
        opened.append(sdk)
        burst = sdk.with_options(max_retries=0)
        refused = 0
        for _ in range(100):
            try:
                burst.completions.create(model=MODEL, prompt="Hi", max_tokens=1)
            except openai.RateLimitError as exc:
                refused += 1
                assert 0 < int(exc.response.headers["retry-after-ms"]) <= 1000
                assert exc.response.headers["retry-after"] == "1"
                assert exc.body["code"] == "rate_limited"
                break
        assert refused == 1, "60 a minute is exhausted within 100 quick requests"
        statuses.clear()
        r = sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=1)  # refused once, then retried
        assert r.choices[0].text is not None
        assert statuses[0] == 429 and statuses[-1] == 200
    finally:
        for sdk in opened:
            sdk.close()
        limited.stop()


def test_sigterm_drains_http_streams(tiny_server) -> None:
    draining = tiny_server("--shutdown-grace", "5")
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 150, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(timeout=20) as h, h.stream("POST", draining.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            draining.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        draining.proc.wait(timeout=20)
    finally:
        draining.stop()
    assert first and rest[-1] == "data: [DONE]", "the running stream finished within the grace period"
    reasons = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in rest[:-1]]
    assert reasons[-1] == "length"
    assert draining.proc.returncode == 0


@pytest.mark.integration
def test_the_real_model_answers_through_the_sdk_as_over_the_websocket(real_server) -> None:
    question = [{"role": "user", "content": "Name three primary colors."}]
    with openai.OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0) as sdk:
        http = sdk.chat.completions.create(model="gpt-4o", messages=question, max_tokens=40, temperature=0)
    assert http.model == "SmolLM2-135M-Instruct"

    async def ws_text() -> str:
        async with websockets.connect(real_server.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "w", "messages": question,
                                      "params": {"temperature": 0, "max_tokens": 40}}))
            while (msg := json.loads(await ws.recv()))["type"] != "done":
                pass
            return msg["text"]

    assert http.choices[0].message.content == asyncio.run(ws_text())


REFUSALS = [  # (what, WebSocket frame, HTTP body, error type): refused at every stage a request can be refused
    ("bad JSON", "{nope", b"{nope", "invalid_json"),
    ("out of range", json.dumps({"type": "generate", "id": "a", "prompt": "x", "params": {"temperature": 12}}),
     json.dumps({"prompt": "x", "temperature": 12}).encode(), "invalid_parameter"),
    ("bad schema", json.dumps({"type": "generate", "id": "b", "prompt": "x", "structured_outputs": {"regex": "(x"}}),
     json.dumps({"prompt": "x", "structured_outputs": {"regex": "(x"}}).encode(), "invalid_constraint"),
    ("too long", json.dumps({"type": "generate", "id": "c", "prompt": "word " * 1000}),
     json.dumps({"prompt": "word " * 1000}).encode(), "context_length_exceeded"),
]


def _refusals(server) -> tuple[dict[str, float], dict[str, int]]:
    """streamgen_requests_total by error type, and the request.rejected log lines by code, so far."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    counted: dict[str, float] = {}  # summed over the other labels (the model, the caller's kind, ...)
    for m in re.finditer(r'^streamgen_requests_total\{[^}]*error_type="([^"]+)"[^}]*\} (\S+)$', text, flags=re.M):
        counted[m.group(1)] = counted.get(m.group(1), 0.0) + float(m.group(2))
    logged: dict[str, int] = {}
    for line in server.output().splitlines():
        if "request.rejected" in line and (m := re.search(r'"code": "([a-z_]+)"', line)):
            logged[m.group(1)] = logged.get(m.group(1), 0) + 1
    return counted, logged


@pytest.mark.parametrize("what,frame,body,code", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refusal_is_counted_and_logged_once_whichever_transport_sent_it(server, what, frame, body,
                                                                          code: str) -> None:
    """The same bad request over the WebSocket and over HTTP: each adds one to streamgen_requests_total with its
    error type, and writes one request.rejected line, in the request service (not per transport)."""
    counted, logged = _refusals(server)

    async def over_ws() -> dict:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(frame)
            return json.loads(await ws.recv())

    assert asyncio.run(over_ws())["code"] == code
    after_ws = _refusals(server)
    reply = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"},
                       timeout=10)
    assert reply.json()["error"]["code"] == code
    after_http = wait_until(lambda: (r := _refusals(server))[1].get(code, 0) >= logged.get(code, 0) + 2 and r, 5,
                            "both log lines")
    for before, after in ((counted, after_ws[0]), (after_ws[0], after_http[0])):
        assert after.get(code, 0) == before.get(code, 0) + 1, "counted once per refusal"
    assert after_http[1].get(code, 0) == logged.get(code, 0) + 2, "logged once per refusal"
