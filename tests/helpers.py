"""Helpers the test modules share: protocol frames and readers, greedy loops, a quiet pull."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from streamgen.engine.generate import generate
from streamgen.engine.request import GenerationRequest, TokenEvent
from streamgen.models.progress import StageProgress

T = TypeVar("T")


def generate_frame(rid: str, prompt: str | None = "Hello world", *, messages: list[dict] | None = None,
                   **params: Any) -> str:
    """A protocol v1 `generate` frame: a plain prompt, or chat messages when given."""
    body: dict[str, Any] = {"type": "generate", "id": rid, "params": params}
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    return json.dumps(body)


def collect(ws, ids: set[str]) -> dict[str, list[dict]]:
    """Read (Starlette test client socket) until every id got its final message; messages per id."""
    out: dict[str, list[dict]] = {i: [] for i in ids}
    pending = set(ids)
    while pending:
        msg = ws.receive_json()
        out[msg["id"]].append(msg)
        if msg["type"] in ("done", "error"):
            assert msg["id"] in pending, f"second final message for {msg['id']}"
            pending.discard(msg["id"])
    return out


def next_for(ws, rid: str) -> dict:
    """The next message about rid, skipping other requests' start and token messages."""
    while (msg := ws.receive_json())["id"] != rid:
        assert msg["type"] in ("start", "token"), msg
    return msg


def check_stream(msgs: list[dict]) -> dict:
    """start, then tokens with consecutive indices, then exactly one done; returns done."""
    assert msgs[0]["type"] == "start" and msgs[0]["prompt_tokens"] > 0
    tokens = [m for m in msgs if m["type"] == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    finals = [m for m in msgs if m["type"] in ("done", "error")]
    assert len(finals) == 1 and msgs[-1] is finals[0]
    done = finals[0]
    assert done["type"] == "done", done
    assert "".join(t["text"] for t in tokens) + done["tail"] == done["text"]
    assert done["usage"]["completion_tokens"] == len(tokens)
    return done


def wait_until(condition: Callable[[], T], timeout: float = 10, what: str = "the condition",
               interval: float = 0.02) -> T:
    """Poll condition() until it returns something truthy, and return that; fail the test naming `what` when
    `timeout` seconds pass first. The one way a test waits for something that happens on its own time."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        time.sleep(interval)
    return value


async def await_until(condition: Callable[[], Awaitable[T]], timeout: float = 10, what: str = "the condition",
                      interval: float = 0.02) -> T:
    """wait_until for a coroutine condition, from async code."""
    deadline = time.monotonic() + timeout
    while not (value := await condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout:g} s")
        await asyncio.sleep(interval)
    return value


def idle(stats: dict) -> bool:
    """A server's /v1/stats says nothing runs or waits."""
    return not (stats["active_requests"] or stats["queued_requests"])


def wait_ready(client, timeout: float = 30) -> None:
    """Until the app behind a Starlette test client says it is ready."""
    wait_until(lambda: client.get("/health/ready").status_code == 200, timeout, "the engine becoming ready", 0.05)


def quiet() -> StageProgress:
    """Pull progress that goes nowhere."""
    return StageProgress(0, io.StringIO())


def solo_tokens(runner, tokenizer, request: GenerationRequest) -> list[int]:
    """A request's token ids when it runs alone through the step loop."""
    return [e.token_id for e in generate(runner, tokenizer, [request]) if isinstance(e, TokenEvent)]


def greedy_slot(runner, slot: int, prompt: list[int], steps: int) -> list[int]:
    """Greedy ids from one KV slot of a SlotRunner, prefill then decode."""
    logits = runner.prefill(slot, prompt)
    out = []
    for _ in range(steps):
        out.append(int(logits.argmax()))
        logits = runner.decode([slot], [out[-1]])[0]
    return out


class BreakableRunner:
    """Wraps the real runner; decode raises once `broken` is set (a failing ORT session).

    step_delay slows each decode step down to a real model's pace, so that a test
    can act on a request before the tiny model has finished it. batch_skew is
    added to the logits of a step with several rows: a build whose kernels
    compute a row differently in a batch."""

    def __init__(self, runner, step_delay: float = 0.0, batch_skew: float = 0.0) -> None:
        self._runner = runner
        self.broken = False
        self.step_delay = step_delay
        self.batch_skew = batch_skew

    def __getattr__(self, name):
        return getattr(self._runner, name)

    def decode(self, slots, ids):
        if self.broken:
            raise RuntimeError("ORT session: CUDA error 700 at /secret/path.cc:42")
        time.sleep(self.step_delay)
        logits = self._runner.decode(slots, ids)
        return logits + self.batch_skew if len(slots) > 1 else logits
