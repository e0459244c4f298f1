"""Benchmark clients: one request over a real connection, timed at the client.

Every benchmark that drives a server measures through here, so time to first
token and inter-token gaps mean the same thing in all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class Streamed:
    """One request as the client saw it."""

    ok: bool
    sent: float  # perf_counter() when the request left
    stamps: list[float] = field(default_factory=list)  # arrival of each token
    final: dict[str, Any] = field(default_factory=dict)  # the done (or error) message
    text: str = ""  # what arrived, joined (SSE)
    ended: float = float("nan")  # perf_counter() when the final message arrived
    finish_reason: str | None = None  # as the server gave it (done message, or the SSE choice's)

    @property
    def tokens(self) -> int:
        return len(self.stamps)

    @property
    def ttft_s(self) -> float:
        return self.stamps[0] - self.sent if self.stamps else float("nan")

    @property
    def itl_s(self) -> list[float]:
        return list(np.diff(self.stamps))

    @property
    def reported_tokens(self) -> int | None:
        """Output tokens as the server counted them (usage.completion_tokens of the final message), if it did."""
        usage = self.final.get("usage") or {}
        return usage.get("completion_tokens")

    @property
    def output_tokens(self) -> int:
        """The server's count where it gave one: a chunk can carry several tokens, or none (text held back
        until its characters are whole), so counting chunks is only the fallback."""
        reported = self.reported_tokens
        return reported if reported is not None else len(self.stamps)


def decode_rate(r: Streamed) -> float | None:
    """Output tokens after the first over the time from the first token's arrival to the final message's."""
    if not r.ok or len(r.stamps) < 2:
        return None
    end = r.stamps[-1] if math.isnan(r.ended) else r.ended
    return (r.output_tokens - 1) / (end - r.stamps[0]) if end > r.stamps[0] else None


async def websocket_request(url: str, frame: dict[str, Any]) -> Streamed:
    """Send one generate frame on a new connection and read its stream to the final message."""
    import websockets

    sent = time.perf_counter()
    try:
        async with websockets.connect(url, max_size=None) as ws:
            sent = time.perf_counter()
            await ws.send(json.dumps(frame))
            return await _read_ws(ws, sent)
    except Exception as exc:  # noqa: BLE001 - a benchmark counts any failure as a failed request
        return Streamed(False, sent, [], {"type": "error", "message": f"{type(exc).__name__}: {exc}"})


async def websocket_together(url: str, frames: list[dict[str, Any]]) -> list[Streamed]:
    """Open one connection per frame first, then send every frame at the same instant and read all the
    streams. Every request's `sent` is that instant, so its time to first token includes waiting for
    the others."""
    import websockets

    sent = time.perf_counter()
    try:
        async with contextlib.AsyncExitStack() as stack:
            sockets = [await stack.enter_async_context(websockets.connect(url, max_size=None)) for _ in frames]
            sent = time.perf_counter()
            await asyncio.gather(*(ws.send(json.dumps(frame)) for ws, frame in zip(sockets, frames, strict=True)))
            return list(await asyncio.gather(*(_read_ws(ws, sent) for ws in sockets)))
    except Exception as exc:  # noqa: BLE001 - a benchmark counts any failure as a failed request
        failed = Streamed(False, sent, [], {"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        return [failed] * len(frames)


async def _read_ws(ws, sent: float) -> Streamed:
    """One request's stream on its own connection, to the done (or error) message."""
    stamps: list[float] = []
    try:
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "token":
                stamps.append(time.perf_counter())
            elif msg["type"] in ("done", "error"):
                return Streamed(msg["type"] == "done" and bool(stamps), sent, stamps, msg,
                                ended=time.perf_counter(), finish_reason=msg.get("finish_reason"))
    except Exception as exc:  # noqa: BLE001 - a benchmark counts any failure as a failed request
        return Streamed(False, sent, stamps, {"type": "error", "message": f"{type(exc).__name__}: {exc}"})


async def sse_request(base_url: str, body: dict[str, Any], path: str = "/v1/chat/completions",
                      headers: dict[str, str] | None = None) -> Streamed:
    """POST one streaming OpenAI-style request (stream forced on) and read the SSE stream to [DONE].
    Each chunk with content counts as a token's arrival; the last chunk with usage is the final."""
    import httpx

    sent = time.perf_counter()
    stamps: list[float] = []
    final: dict[str, Any] = {}
    pieces: list[str] = []
    reason: str | None = None
    try:
        async with httpx.AsyncClient(timeout=None) as client:
            sent = time.perf_counter()
            async with client.stream("POST", base_url + path, headers=headers,
                                     json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
                if r.status_code != 200:
                    return Streamed(False, sent, stamps, json.loads(await r.aread()))
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        return Streamed(bool(stamps), sent, stamps, final, "".join(pieces), time.perf_counter(),
                                        reason)
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return Streamed(False, sent, stamps, chunk)
                    if text := "".join(_chunk_text(c) for c in chunk.get("choices", ())):
                        stamps.append(time.perf_counter())
                        pieces.append(text)
                    reason = next((c["finish_reason"] for c in chunk.get("choices", ()) if c.get("finish_reason")),
                                  reason)
                    if chunk.get("usage"):
                        final = chunk
        return Streamed(False, sent, stamps, {"error": "the stream ended without [DONE]"})
    except Exception as exc:  # noqa: BLE001 - a benchmark counts any failure as a failed request
        return Streamed(False, sent, stamps, {"error": f"{type(exc).__name__}: {exc}"})


def _chunk_text(choice: dict[str, Any]) -> str:
    return (choice.get("delta") or {}).get("content") or choice.get("text") or ""


def percentiles(values_s: list[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds."""
    if not values_s:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    a = np.asarray(values_s) * 1000
    return {f"p{p}": round(float(np.percentile(a, p)), 2) for p in (50, 95, 99)}
