"""Abuse against real `streamgen serve` processes (tiny model, so it runs in CI in seconds):
the hostile-input corpus, load with faults, overload, and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
import websockets.sync.client

from conftest import API_KEY, ServerProcess
from helpers import await_until, idle, wait_until

CORPUS = json.loads((Path(__file__).parent / "hostile_corpus.json").read_text())["cases"]


@pytest.fixture(scope="module")
def hostile_server(tiny_server) -> Iterator[ServerProcess]:
    server = tiny_server("--max-message-bytes", "8192")
    yield server
    server.stop()


async def _run_case(url: str, case: dict) -> str | None:
    """Send the case's frames on a fresh connection; None when the expectation is met, else what went wrong."""
    expect = case["expect"]
    async with websockets.connect(url, max_size=None) as ws:
        for frame in case["frames"]:
            await ws.send(bytes.fromhex(frame["binary"]) if isinstance(frame, dict) else frame)
        pongs = 0
        try:
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=10))
                if msg["type"] == "pong":
                    pongs += 1
                    if pongs == expect.get("pongs"):
                        return None
                elif msg["type"] == "error":
                    if msg["code"] != expect.get("error"):
                        return f"got error {msg['code']}: {msg['message']}"
                    if "param" in expect and msg.get("param") != expect["param"]:
                        return f"param {msg.get('param')!r}, expected {expect['param']!r}"
                    return None
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code if closed.rcvd else None
            return None if code == expect.get("close") else f"connection closed with {code}"


async def _healthy_client(url: str, stop: asyncio.Event, results: list[dict]) -> None:
    n = 0
    async with websockets.connect(url) as ws:
        while not stop.is_set() or n == 0:
            await ws.send(json.dumps({"type": "generate", "id": f"ok{n}", "prompt": "The quick brown fox",
                                      "params": {"temperature": 0, "max_tokens": 40, "ignore_eos": True}}))
            tokens = 0
            while (msg := json.loads(await ws.recv()))["type"] not in ("done", "error"):
                tokens += msg["type"] == "token"
            results.append({**msg, "streamed": tokens})
            n += 1


def test_hostile_corpus_gets_typed_errors_while_a_healthy_client_is_served(hostile_server) -> None:
    assert len(CORPUS) >= 40

    async def run() -> tuple[list[str], list[dict]]:
        stop = asyncio.Event()
        healthy: list[dict] = []
        task = asyncio.create_task(_healthy_client(hostile_server.ws_url, stop, healthy))
        failures = []
        for case in CORPUS:
            problem = await _run_case(hostile_server.ws_url, case)
            if problem:
                failures.append(f"{case['name']}: {problem}")
        stop.set()
        await task
        return failures, healthy

    failures, healthy = asyncio.run(run())
    assert failures == []
    assert len(healthy) >= 2, "the healthy client kept being served during the whole corpus"
    assert all(r["type"] == "done" and r["usage"]["completion_tokens"] == 40 == r["streamed"] for r in healthy)
    assert hostile_server.proc.poll() is None, "the server is still up"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_load_with_faults_loses_nothing_and_returns_memory(tiny_server) -> None:
    server = tiny_server("--max-batch", "16", "--max-queued", "512")
    rng = random.Random(7)
    plan = [rng.choice(["normal", "normal", "disconnect", "cancel"]) for _ in range(200)]

    async def client(i: int, kind: str) -> dict:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "id": f"r{i}", "prompt": "Hello world",
                                      "params": {"temperature": 0.8, "seed": i, "max_tokens": rng.randint(5, 60),
                                                 "ignore_eos": True}}))
            finals, tokens = [], 0
            while True:
                msg = json.loads(await ws.recv())
                if msg["type"] == "token":
                    tokens += 1
                    if kind == "disconnect" and tokens == 2:
                        ws.transport.abort()  # vanish mid-stream
                        return {"kind": kind, "finals": None}
                    if kind == "cancel" and tokens == 2:
                        await ws.send(json.dumps({"type": "cancel", "id": f"r{i}"}))
                elif msg["type"] in ("done", "error"):
                    finals.append(msg)
                    # Anything after the final message would be a second final: wait briefly for it.
                    try:
                        extra = json.loads(await asyncio.wait_for(ws.recv(), timeout=0.05))
                        finals.append(extra)
                    except (asyncio.TimeoutError, websockets.ConnectionClosed):
                        pass
                    return {"kind": kind, "finals": finals, "tokens": tokens}

    async def run(kinds: list[str]) -> list[dict]:
        return await asyncio.gather(*(client(i, k) for i, k in enumerate(kinds)))

    try:
        # Warm-up with the same load, twice: allocator arenas, ORT buffers per batch width,
        # connection buffers. A leak shows as growth from this level onwards.
        asyncio.run(run(plan))
        asyncio.run(run(plan))
        time.sleep(0.5)
        baseline = _rss_kib(server.proc.pid)
        results = asyncio.run(run(plan))
        wait_until(lambda: idle(server.stats()), 10, "every request ending")
        time.sleep(0.5)
        after = _rss_kib(server.proc.pid)
    finally:
        server.stop()
    kept = [r for r in results if r["finals"] is not None]
    assert len(kept) == plan.count("normal") + plan.count("cancel")
    for r in kept:
        assert len(r["finals"]) == 1, f"exactly one final message, got {r['finals']}"
        final = r["finals"][0]
        assert final["type"] == "done", final
        if r["kind"] == "cancel":
            assert final["finish_reason"] in ("cancelled", "length")
        else:
            assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == r["tokens"]
    print(f"\n200 connections: {len(kept)} kept, {len(results) - len(kept)} abandoned, "
          f"RSS {baseline} KiB after warm-up, {after} KiB after the run")
    assert after <= baseline * 1.10, f"RSS {after} KiB after the run vs {baseline} KiB after warm-up"


def test_queue_full_refusals_carry_retry_after_and_retrying_then_succeeds(tiny_server) -> None:
    server = tiny_server("--max-batch", "1", "--max-queued", "1")

    def gen(rid: str, max_tokens: int) -> str:
        return json.dumps({"type": "generate", "id": rid, "prompt": "Hello",
                           "params": {"max_tokens": max_tokens, "ignore_eos": True}})

    async def run() -> tuple[dict, dict]:
        async with websockets.connect(server.ws_url) as ws:
            async def until(rid: str, types: tuple[str, ...]) -> dict:
                while True:
                    msg = json.loads(await ws.recv())
                    if msg["id"] == rid and msg["type"] in types:
                        return msg

            await ws.send(gen("running", 250))
            await until("running", ("token",))  # it holds the only slot
            await ws.send(gen("waiting", 250))
            await until("waiting", ("start",))  # it fills the queue of one
            await ws.send(gen("refused", 5))
            refused = await until("refused", ("error", "done"))
            await until("waiting", ("done", "error"))
            await asyncio.sleep(refused.get("retry_after_ms", 0) / 1000)
            await ws.send(gen("retry", 5))
            return refused, await until("retry", ("done", "error"))

    try:
        refused, retried = asyncio.run(run())
    finally:
        server.stop()
    assert refused["type"] == "error" and refused["code"] == "overloaded", refused
    assert refused["retry_after_ms"] > 0
    assert retried["type"] == "done"


@pytest.mark.parametrize("grace", [0, 5])
def test_sigterm_finishes_or_ends_every_stream_and_closes_with_1001(tiny_server, grace: int) -> None:
    server = tiny_server("--shutdown-grace", str(grace), "--max-batch", "4")

    async def stream(rid: str, max_tokens: int, ready: asyncio.Event) -> tuple[list[dict], int | None]:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "generate", "id": rid, "prompt": "Hello",
                                      "params": {"max_tokens": max_tokens, "ignore_eos": True}}))
            msgs = []
            try:
                while True:
                    msg = json.loads(await ws.recv())
                    if msg["type"] == "token":
                        ready.set()
                    else:
                        msgs.append(msg)
            except websockets.ConnectionClosed as closed:
                return msgs, closed.rcvd.code if closed.rcvd else None

    async def run():
        ready = asyncio.Event()
        # With no grace the long ones are cut short; with 5 s every one finishes.
        tasks = [asyncio.create_task(stream("short", 20, ready))]
        tasks += [asyncio.create_task(stream(f"long{i}", 230, ready)) for i in range(2)]
        await ready.wait()
        server.proc.send_signal(signal.SIGTERM)
        return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(run())
        server.proc.wait(timeout=20)
    finally:
        server.stop()
    kinds = []
    for finals, close_code in results:
        finals = [m for m in finals if m["type"] in ("done", "error")]
        assert len(finals) == 1, finals
        kinds.append(finals[0]["type"] if finals[0]["type"] == "done" else finals[0]["code"])
        assert close_code == 1001
    if grace:
        assert kinds == ["done"] * 3, "within the grace period running requests finish"
    else:
        assert "shutting_down" in kinds and set(kinds) <= {"done", "shutting_down"}
    assert server.proc.returncode == 0
    log = server.output()
    assert "server.draining" in log and "server.drained" in log


def test_real_server_refuses_missing_wrong_keys_and_foreign_origins(keyed_server) -> None:
    async def status(**kwargs) -> int:
        try:
            async with websockets.connect(keyed_server.ws_url, **kwargs):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    async def run():
        return (
            await status(),
            await status(subprotocols=["streamgen.v1", "bearer.wrong-key-0000000000"]),
            await status(subprotocols=["streamgen.v1", f"bearer.{API_KEY}"], origin="https://evil.example.net"),
            await status(subprotocols=["streamgen.v1", f"bearer.{API_KEY}"]),
            await status(additional_headers={"Authorization": f"Bearer {API_KEY}"}),
        )

    assert asyncio.run(run()) == (401, 401, 403, 101, 101)


def test_a_client_that_stops_reading_is_closed_with_1008_and_its_requests_cancelled(tiny_server) -> None:
    """The slow-reader policy (docs/protocol.md): the client asks for far more than the network buffers hold and
    reads nothing; once --max-unsent-messages wait, its requests are cancelled (the engine is free again, long
    before they would have finished) and, when it reads at last, the close code says why."""
    server = tiny_server("--max-unsent-messages", "16", "--max-requests-per-connection", "8")
    requests, max_tokens = 8, 200

    async def run() -> tuple[int, int]:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's sends back up
        # max_queue=1: the client library stops reading the socket while its one queued message is unread.
        async with websockets.connect(server.ws_url, sock=sock, max_queue=1, max_size=None) as ws:
            for i in range(requests):
                await ws.send(json.dumps({"type": "generate", "id": f"r{i}", "prompt": "Hello", "params": {
                    "max_tokens": max_tokens, "ignore_eos": True, "logprobs": True, "top_logprobs": 20}}))
            await await_until(lambda: asyncio.to_thread(lambda: _cancelled(server) >= requests), 30,
                              "the unread requests being cancelled")
            tokens = 0
            try:
                while True:
                    tokens += json.loads(await ws.recv())["type"] == "token"
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else -1, tokens

    code, tokens = asyncio.run(run())
    assert code == 1008, "closed for not reading, with the policy's code"
    assert tokens < requests * max_tokens, "the requests were stopped, not run to their end"
    assert idle(server.stats())
    with websockets.sync.client.connect(server.ws_url) as other:  # the server serves everyone else
        other.send(json.dumps({"type": "generate", "id": "x", "prompt": "Hello", "params": {"max_tokens": 3}}))
        while json.loads(other.recv())["type"] not in ("done", "error"):
            pass


def _cancelled(server) -> float:
    """streamgen.requests{finish_reason=cancelled} from /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=5).text
    found = re.search(r'^streamgen_requests_total\{[^}]*finish_reason="cancelled"[^}]*\} (\S+)$', text, flags=re.M)
    return float(found.group(1)) if found else 0.0
