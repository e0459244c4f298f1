"""WebSocket protocol v1 through Starlette's test client, on the tiny model."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from streamgen.config import Settings
from streamgen.engine.config import EngineConfig
from streamgen.engine.engine import Engine
from streamgen.engine.loader import load_model
from streamgen.engine.slots import SlotConfig
from streamgen.server.app import create_app

from conftest import CPU
from helpers import BreakableRunner, check_stream, collect, generate_frame, next_for, wait_ready, wait_until

LONG = {"temperature": 0, "max_tokens": 200, "ignore_eos": True}


def _client(model_dir: Path, settings: Settings = Settings(), limits: EngineConfig = EngineConfig(),
            slots: SlotConfig = SlotConfig()) -> TestClient:
    engine = Engine(lambda: load_model(model_dir, CPU, slots=slots), limits)
    return TestClient(create_app(settings, engine))


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    with _client(tiny_model_dir, Settings(max_requests_per_connection=3, max_message_bytes=4096)) as c:
        wait_ready(c)
        yield c


def test_generate_streams_start_tokens_done(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(generate_frame("a", temperature=0, max_tokens=12, ignore_eos=True, logprobs=True))
        msgs = collect(ws, {"a"})["a"]
    done = check_stream(msgs)
    assert done["finish_reason"] == "length"
    assert all(m["logprob"] <= 0 for m in msgs if m["type"] == "token")
    t = done["timings"]
    assert t["total_ms"] >= t["time_to_first_token_ms"] >= t["prefill_ms"] >= 0  # rounded: 0 on a fast machine
    assert t["decode_tokens_per_s"] > 0


def test_concurrent_requests_on_one_socket_each_match_their_solo_run(client: TestClient) -> None:
    prompts = {"x": "The quick brown fox", "y": "Paris is", "z": "Numbers: 1 2 3"}
    solo = {}
    with client.websocket_connect("/v1/ws") as ws:
        for rid, p in prompts.items():
            ws.send_text(generate_frame(rid, p, temperature=0, max_tokens=10, ignore_eos=True))
            solo[rid] = check_stream(collect(ws, {rid})[rid])["text"]
        for rid, p in prompts.items():
            ws.send_text(generate_frame(rid, p, temperature=0, max_tokens=10, ignore_eos=True))
        together = collect(ws, set(prompts))
    for rid in prompts:
        assert check_stream(together[rid])["text"] == solo[rid]


def test_multi_turn_chat_over_one_socket(client: TestClient) -> None:
    history = [{"role": "user", "content": "Hello"}]
    with client.websocket_connect("/v1/ws") as ws:
        for turn in range(3):
            ws.send_text(json.dumps({"type": "generate", "id": f"t{turn}", "messages": history,
                                     "params": {"temperature": 0, "max_tokens": 6, "ignore_eos": True}}))
            msgs = collect(ws, {f"t{turn}"})[f"t{turn}"]
            done = check_stream(msgs)
            history += [{"role": "assistant", "content": done["text"]}, {"role": "user", "content": "More"}]
            usage, timings = done["usage"], done["timings"]
            if turn:
                assert msgs[0]["prompt_tokens"] > previous_prompt, "each turn carries the conversation"
                # The slot kept the previous turn: at least its whole prompt is reused, not prefilled again.
                assert usage["cached_tokens"] >= previous_prompt
            assert timings["prefill_tokens"] == usage["prompt_tokens"] - usage["cached_tokens"] >= 1
            previous_prompt = msgs[0]["prompt_tokens"]


def test_truncate_oldest_drops_turns_until_the_chat_fits(client: TestClient) -> None:
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"Question {i}: Paris is the capital of France."},
                    {"role": "assistant", "content": "Berlin is the capital of Germany. The quick brown fox."}]
    history = [{"role": "system", "content": "Be brief."}, *history, {"role": "user", "content": "Last question"}]
    frame = {"type": "generate", "id": "long", "messages": history, "params": {"temperature": 0, "max_tokens": 8}}
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(json.dumps(frame))
        err = ws.receive_json()
        assert err["code"] == "context_length_exceeded" and 'truncate: "oldest"' in err["message"]
        ws.send_text(json.dumps({**frame, "truncate": "oldest"}))
        msgs = collect(ws, {"long"})["long"]
        start, done = msgs[0], check_stream(msgs)
        dropped = start["truncated_messages"]
        assert dropped > 0 and dropped % 2 == 0, "whole turns go: a question and its answer"
        assert start["prompt_tokens"] + 8 <= 256 and done["finish_reason"] in ("stop", "length")
        ws.send_text(json.dumps({"type": "generate", "id": "p", "prompt": "Hi", "truncate": "oldest"}))
        assert ws.receive_json()["param"] == "truncate", "a plain prompt is never cut"


def test_cancel_stops_within_a_step_and_keeps_the_connection(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(generate_frame("c", **LONG))
        assert ws.receive_json()["type"] == "start"
        assert ws.receive_json()["type"] == "token"
        ws.send_text(json.dumps({"type": "cancel", "id": "c"}))
        msgs = collect(ws, {"c"})["c"]
        done = msgs[-1]
        assert done["type"] == "done" and done["finish_reason"] == "cancelled"
        assert done["usage"]["completion_tokens"] < 200
        ws.send_text(json.dumps({"type": "ping", "id": "p1"}))
        assert ws.receive_json() == {"type": "pong", "id": "p1"}


def test_disconnect_aborts_the_clients_requests(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(generate_frame("d1", **LONG))
        ws.send_text(generate_frame("d2", **LONG))
        while ws.receive_json()["type"] != "token":
            pass
    wait_until(lambda: not client.get("/v1/stats").json()["active_requests"], 5, "the abandoned requests ending")


ERROR_CASES = [
    ("{not json", "invalid_json", None),
    ('{"type": "generate", "id": "n", "prompt": "x", "params": {"temperature": NaN}}', "invalid_json", None),
    ("[1, 2]", "invalid_message", None),
    ('{"id": "q"}', "invalid_message", "type"),
    ('{"type": "dance", "id": "q"}', "unknown_type", "type"),
    ('{"type": "generate", "prompt": "x"}', "invalid_message", "id"),
    ('{"type": "generate", "id": 5, "prompt": "x"}', "invalid_message", "id"),
    ('{"type": "generate", "id": "q", "prompt": "x", "colour": "red"}', "invalid_message", "colour"),
    ('{"type": "generate", "id": "q"}', "invalid_request", "prompt"),
    ('{"type": "generate", "id": "q", "prompt": "x", "messages": []}', "invalid_request", "prompt"),
    ('{"type": "generate", "id": "q", "prompt": ""}', "invalid_request", "prompt"),
    ('{"type": "generate", "id": "q", "messages": [{"role": "robot", "content": "x"}]}', "invalid_request", "messages[0]"),
    ('{"type": "generate", "id": "q", "prompt": "x", "params": {"temperature": -1}}', "invalid_parameter", "temperature"),
    ('{"type": "generate", "id": "q", "prompt": "x", "params": {"top_p": 2}}', "invalid_parameter", "top_p"),
    ('{"type": "generate", "id": "q", "prompt": "x", "params": {"warp": 9}}', "invalid_parameter", "warp"),
    ('{"type": "generate", "id": "q", "prompt": "x", "params": {"max_tokens": 100000}}', "context_length_exceeded", "max_tokens"),
    ('{"type": "generate", "id": "q", "prompt": "x", "params": {"stop_token_ids": [999999]}}', "invalid_parameter", "stop_token_ids"),
    ('{"type": "cancel", "id": "never-sent"}', "unknown_id", "id"),
]


@pytest.mark.parametrize(("frame", "code", "param"), ERROR_CASES)
def test_bad_input_gets_a_typed_error_and_the_connection_stays_up(client: TestClient, frame: str, code: str, param) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(frame)
        err = ws.receive_json()
        assert err["type"] == "error" and err["code"] == code and err["param"] == param, err
        assert err["message"]
        ws.send_text(generate_frame("ok", temperature=0, max_tokens=3))
        check_stream(collect(ws, {"ok"})["ok"])


def test_prompt_longer_than_the_context_is_refused(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(generate_frame("long", "word " * 400, max_tokens=1))
        err = ws.receive_json()
        assert err["code"] == "context_length_exceeded" and err["param"] == "prompt" and err["id"] == "long"


def test_duplicate_id_and_per_connection_limit(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(generate_frame("same", **LONG))
        assert ws.receive_json()["type"] == "start"
        ws.send_text(generate_frame("same", **LONG))
        msg = ws.receive_json()
        while msg["type"] == "token":
            msg = ws.receive_json()
        assert msg["type"] == "error" and msg["code"] == "duplicate_id" and msg["id"] == "same"
        ws.send_text(generate_frame("two", **LONG))
        ws.send_text(generate_frame("three", **LONG))
        ws.send_text(generate_frame("four", **LONG))  # limit is 3 in flight
        msg = next_for(ws, "four")
        assert msg["type"] == "error" and msg["code"] == "too_many_requests"
        for rid in ("same", "two", "three"):
            ws.send_text(json.dumps({"type": "cancel", "id": rid}))


def test_binary_frames_are_rejected_with_a_clear_error(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_bytes(b"\x00\x01binary")
        err = ws.receive_json()
        assert err["code"] == "binary_not_supported" and "JSON text" in err["message"]
        ws.send_text(json.dumps({"type": "ping"}))
        assert ws.receive_json() == {"type": "pong"}


def test_oversized_message_closes_with_1009(client: TestClient) -> None:
    with client.websocket_connect("/v1/ws") as ws:
        ws.send_text(generate_frame("big", "x" * 5000))
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1009


def test_queue_full_is_refused_at_once_with_retry_after(tiny_model_dir: Path) -> None:
    from streamgen.engine.loader import LoadedModel

    model = load_model(tiny_model_dir, CPU, slots=SlotConfig(max_batch=1))
    # 20 ms a step: 200 tokens take 4 s, so both requests are still running when
    # the cancels land (the tiny model alone finishes them in a fraction of a second).
    slow = LoadedModel(model.directory, model.manifest, BreakableRunner(model.runner, step_delay=0.02),
                       model.tokenizer)
    with TestClient(create_app(Settings(), Engine(lambda: slow, EngineConfig(max_queued=1)))) as c:
        wait_ready(c)
        with c.websocket_connect("/v1/ws") as ws:
            ws.send_text(generate_frame("running", **LONG))
            while ws.receive_json()["type"] != "token":
                pass
            ws.send_text(generate_frame("waiting", **LONG))
            assert next_for(ws, "waiting")["type"] == "start"
            ws.send_text(generate_frame("refused", **LONG))
            msg = next_for(ws, "refused")
            assert msg["type"] == "error" and msg["code"] == "overloaded" and msg["retry_after_ms"] > 0
            for rid in ("running", "waiting"):
                ws.send_text(json.dumps({"type": "cancel", "id": rid}))
            finals = collect(ws, {"running", "waiting"})
            assert {m[-1]["finish_reason"] for m in finals.values()} == {"cancelled"}


def test_http_endpoints(client: TestClient, tiny_hf_dir: Path) -> None:
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").json() == {"status": "ready"}
    model = client.get("/v1/models").json()["data"][0]
    assert model["id"] == str(Path(tiny_hf_dir).resolve())
    assert model["context_length"] == 256 and model["device"] == "cpu" and model["quantization"] == "none"
    page = client.get("/")
    assert page.status_code == 200 and "streamgen" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


def test_ready_is_503_while_loading_and_after_a_failure(tiny_model_dir: Path) -> None:
    release = threading.Event()

    def slow_load():
        release.wait(10)
        return load_model(tiny_model_dir, CPU)

    with TestClient(create_app(Settings(), Engine(slow_load))) as c:
        r = c.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert c.get("/health/live").status_code == 200
        with c.websocket_connect("/v1/ws") as ws:
            ws.send_text(generate_frame("early"))
            assert ws.receive_json()["code"] == "engine_unavailable"
        release.set()
        wait_ready(c)

    def broken_load():
        raise RuntimeError("model file is corrupt")

    with TestClient(create_app(Settings(), Engine(broken_load))) as c:
        r = wait_until(lambda: (r := c.get("/health/ready")).json()["status"] != "loading" and r, 5,
                       "the failed load being reported")
        assert r.status_code == 503 and r.json()["status"] == "failed" and "corrupt" in r.json()["error"]


def test_engine_failure_ends_requests_with_internal_and_marks_not_ready(tiny_model_dir: Path) -> None:
    from streamgen.engine.loader import LoadedModel

    model = load_model(tiny_model_dir, CPU)
    runner = BreakableRunner(model.runner)
    broken_model = LoadedModel(model.directory, model.manifest, runner, model.tokenizer)
    with TestClient(create_app(Settings(), Engine(lambda: broken_model))) as c:
        wait_ready(c)
        with c.websocket_connect("/v1/ws") as ws:
            ws.send_text(generate_frame("victim", **LONG))
            assert ws.receive_json()["type"] == "start"
            assert ws.receive_json()["type"] == "token"
            runner.broken = True
            msg = next_for(ws, "victim")
            while msg["type"] == "token":
                msg = next_for(ws, "victim")
            assert msg["type"] == "error" and msg["code"] == "internal"
            assert "secret" not in msg["message"] and "Traceback" not in msg["message"], "no internals leak"
            ws.send_text(generate_frame("after"))
            assert ws.receive_json()["code"] == "engine_unavailable"
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "failed"


def test_the_engine_checks_batch_invariance_at_start_up_and_reports_it(client: TestClient, tiny_model_dir) -> None:
    from streamgen.engine.loader import LoadedModel

    assert client.get("/v1/models").json()["data"][0]["batch_invariant"] is True
    model = load_model(tiny_model_dir, CPU)
    # A build whose kernels compute a row differently when it shares a step with others.
    skewed = LoadedModel(model.directory, model.manifest, BreakableRunner(model.runner, batch_skew=1e-3),
                         model.tokenizer)
    with TestClient(create_app(Settings(), Engine(lambda: skewed))) as c:
        wait_ready(c)
        assert c.get("/v1/models").json()["data"][0]["batch_invariant"] is False
