"""End to end: a real uvicorn server on the real default model, real WebSocket clients."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from streamgen.engine.loader import load_model
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import prepare_request
from streamgen.engine.tokenizer import ChatMessage

from conftest import CPU
from helpers import generate_frame, idle, solo_tokens, wait_until

pytestmark = pytest.mark.integration

QUESTION = "Write a short poem about the sea."


def _generate_msg(rid: str, **params) -> str:
    return generate_frame(rid, messages=[{"role": "user", "content": QUESTION}], **params)


async def _stream(url: str, rid: str, **params) -> list[tuple[float, dict]]:
    async with websockets.connect(url) as ws:
        await ws.send(_generate_msg(rid, **params))
        out = []
        while True:
            msg = json.loads(await ws.recv())
            out.append((time.monotonic(), msg))
            if msg["type"] in ("done", "error"):
                return out


def test_tokens_stream_incrementally_and_match_the_engine(real_server, real_default_dir) -> None:
    timed = asyncio.run(_stream(real_server.ws_url, "poem", temperature=0, max_tokens=48))
    msgs = [m for _, m in timed]
    tokens = [(t, m) for t, m in timed if m["type"] == "token"]
    done = msgs[-1]
    assert msgs[0]["type"] == "start" and done["type"] == "done"
    assert len(tokens) >= 10
    # Arrival times are spread over the generation, not bunched at the end.
    span = tokens[-1][0] - tokens[0][0]
    gaps = [b[0] - a[0] for a, b in zip(tokens, tokens[1:])]
    assert span > 0.2 and max(gaps) < span / 2
    streamed = "".join(m["text"] for _, m in tokens) + done["tail"]
    assert streamed == done["text"]

    # The same request through the engine alone, in this process, on the same build.
    real_model = load_model(real_default_dir, CPU)
    params = SamplingParams(temperature=0, max_tokens=48)
    req = prepare_request(real_model.tokenizer, real_model.context_length, params,
                          messages=[ChatMessage("user", QUESTION)])
    ids = solo_tokens(real_model.runner, real_model.tokenizer, req)
    assert [m["token_id"] for _, m in tokens] == ids


def test_disconnect_mid_stream_frees_the_request(real_server) -> None:
    async def leave_early() -> None:
        ws = await websockets.connect(real_server.ws_url)
        await ws.send(_generate_msg("gone", temperature=0, max_tokens=400, ignore_eos=True))
        while json.loads(await ws.recv())["type"] != "token":
            pass
        assert real_server.stats()["active_requests"] == 1
        ws.transport.abort()  # no close handshake: the client just vanishes

    asyncio.run(leave_early())
    wait_until(lambda: idle(real_server.stats()), 5, "the abandoned request ending")


def test_ping_is_answered_promptly_during_a_long_generation(real_server) -> None:
    async def run() -> tuple[float, int, int]:
        async with websockets.connect(real_server.ws_url) as ws:
            await ws.send(_generate_msg("long", temperature=0, max_tokens=150, ignore_eos=True))
            seen = 0
            while seen < 5:
                if json.loads(await ws.recv())["type"] == "token":
                    seen += 1
            await ws.send(json.dumps({"type": "ping", "id": "p"}))
            tokens_before_pong = 0
            while (msg := json.loads(await ws.recv()))["type"] != "pong":
                tokens_before_pong += msg["type"] == "token"
            remaining = 0
            while (msg := json.loads(await ws.recv()))["type"] != "done":
                remaining += 1
            return tokens_before_pong, remaining

    before, remaining = asyncio.run(run())
    # The generation has ~145 tokens left; the pong comes back within a step or two instead of after them
    # (counted in tokens, not seconds, so a faster or slower machine reads the same).
    assert before <= 10 and remaining > 100


def test_oversized_frame_closes_with_1009(real_server) -> None:
    async def run() -> int:
        async with websockets.connect(real_server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "big", "prompt": "x" * 70000}))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            return closed.value.rcvd.code

    assert asyncio.run(run()) == 1009


def test_sixteen_concurrent_clients_share_batches_and_all_finish_correctly(real_server, real_default_dir) -> None:
    questions = [f"Give me one fact about the number {n}." for n in range(16)]

    async def client(i: int) -> list[dict]:
        async with websockets.connect(real_server.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "id": f"q{i}",
                                      "messages": [{"role": "user", "content": questions[i]}],
                                      "params": {"temperature": 0, "max_tokens": 24}}))
            msgs = []
            while True:
                msgs.append(json.loads(await ws.recv()))
                if msgs[-1]["type"] in ("done", "error"):
                    return msgs

    async def all_clients():
        return await asyncio.gather(*(client(i) for i in range(16)))

    before = _batched_steps(real_server)
    results = asyncio.run(all_clients())
    assert _batched_steps(real_server) - before > 0, "requests must have shared decode steps (metric)"
    stats = real_server.stats()
    assert stats["max_batch_size_seen"] > 1
    assert stats["active_requests"] == 0 and stats["queued_requests"] == 0

    model = load_model(real_default_dir, CPU)
    for i, msgs in enumerate(results):
        done = msgs[-1]
        assert done["type"] == "done" and done["id"] == f"q{i}", done
        tokens = [m for m in msgs if m["type"] == "token"]
        assert "".join(m["text"] for m in tokens) + done["tail"] == done["text"]
        assert done["usage"]["completion_tokens"] == len(tokens)
        # Batched greedy output equals the same request run alone.
        req = prepare_request(model.tokenizer, model.context_length, SamplingParams(temperature=0, max_tokens=24),
                              messages=[ChatMessage("user", questions[i])])
        solo = solo_tokens(model.runner, model.tokenizer, req)
        assert [m["token_id"] for m in tokens] == solo


def _batched_steps(server) -> float:
    """Decode steps with more than one request, from the server's batch-size histogram."""
    import httpx

    text = httpx.get(server.url + "/metrics", timeout=5).text
    count = sum(float(line.split()[-1]) for line in text.splitlines()
                if line.startswith("streamgen_engine_batch_size_count"))
    single = sum(float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith("streamgen_engine_batch_size_bucket") and 'le="1.0"' in line)
    return count - single


C_PROMPTS = ["Write a haiku about autumn leaves.", "Name three primary colors.", "What is 12 times 12?",
             "Describe a cat in one sentence.", "Give me a tip for learning to code."]


def test_a_request_in_a_freed_slot_below_a_busy_one_equals_its_solo_run(real_server) -> None:
    """A takes slot 0 and ends after 3 tokens; B takes slot 1 and keeps decoding; C then takes the freed
    slot 0. Every C must give its solo tokens (decode steps of B used to write into row 0)."""

    def chat(rid: str, text: str, **params) -> str:
        return generate_frame(rid, messages=[{"role": "user", "content": text}], temperature=0, **params)

    async def until_final(ws, rid: str) -> list[dict]:
        msgs = []
        while True:
            msg = json.loads(await ws.recv())
            if msg.get("id") == rid:
                msgs.append(msg)
                if msg["type"] in ("done", "error"):
                    return msgs

    async def run() -> list[tuple[list[int], list[int]]]:
        results = []
        async with websockets.connect(real_server.ws_url) as ws:
            for i, prompt in enumerate(C_PROMPTS):
                solo = await until_final(ws, (await ws.send(chat(f"solo{i}", prompt, max_tokens=40))) or f"solo{i}")
                await ws.send(chat(f"a{i}", "What is the capital of France?", max_tokens=3))
                while json.loads(await ws.recv())["type"] != "token":
                    pass  # A holds its slot
                await ws.send(chat(f"b{i}", "Tell me a long story about a dragon.", max_tokens=400, ignore_eos=True))
                await until_final(ws, f"a{i}")  # A is done: its slot is free, B keeps decoding above it
                await ws.send(chat(f"c{i}", prompt, max_tokens=40))
                crowded = await until_final(ws, f"c{i}")
                await ws.send(json.dumps({"type": "cancel", "id": f"b{i}"}))
                await until_final(ws, f"b{i}")
                results.append(([m["token_id"] for m in solo if m["type"] == "token"],
                                [m["token_id"] for m in crowded if m["type"] == "token"]))
        return results

    for solo, crowded in asyncio.run(run()):
        assert len(solo) >= 5 and crowded == solo


def test_the_second_turn_of_a_chat_reuses_the_first(real_server) -> None:
    async def run() -> tuple[dict, dict, dict]:
        history = [{"role": "user", "content": "Tell me a joke."}]
        async with websockets.connect(real_server.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "t1", "messages": history,
                                      "params": {"temperature": 0, "max_tokens": 100}}))
            first = [json.loads(await ws.recv())]
            while first[-1]["type"] not in ("done", "error"):
                first.append(json.loads(await ws.recv()))
            history += [{"role": "assistant", "content": first[-1]["text"]},
                        {"role": "user", "content": "Another one, please."}]
            await ws.send(json.dumps({"type": "generate", "id": "t2", "messages": history,
                                      "params": {"temperature": 0, "max_tokens": 20}}))
            second = [json.loads(await ws.recv())]
            while second[-1]["type"] not in ("done", "error"):
                second.append(json.loads(await ws.recv()))
        return first[0], first[-1], second[-1]

    start, first, second = asyncio.run(run())
    assert first["finish_reason"] == "stop", "ended by the model's end-of-turn token"
    # The slot holds turn 1's prompt and every token it fed back; the re-rendered history matches them
    # all (the end-of-turn token was sampled but never fed, so nothing there can differ).
    held = start["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert second["usage"]["cached_tokens"] == held
    assert second["timings"]["prefill_tokens"] == second["usage"]["prompt_tokens"] - held
