"""What a level of concurrent clients measured, summed up: tokens/s, time to first token and inter-token
latency at the client, and the ratios streamgen / llama-server; and "arrive together": a burst against the
server and the same requests through the engine in this process."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamgen.bench.clients import Streamed, percentiles, sse_request, websocket_together
from streamgen.bench.peers.workload import (LLAMA, STREAMGEN, Target, llama_body, openai_path, streamgen_body,
                                           together_frames)

# (level, measure, direction, target): streamgen / llama-server, as the issue states them.
TARGETS = (
    (16, "tokens_per_s", ">=", 2.0),
    (16, "ttft_p50", "<=", 0.5),
    (16, "itl_p95", "<=", 1.0),
    (1, "tokens_per_s", ">=", 1.3),
)
TOGETHER_TARGET = 0.90  # the server's share of the offline engine's tokens/s



@dataclass(frozen=True, slots=True)
class Sent:
    max_tokens: int
    result: Streamed


@dataclass(frozen=True, slots=True)
class LevelRun:
    """One level on one server in one round."""

    server: str
    concurrency: int
    round: int
    sent: list[Sent]
    wall_s: float


async def _client(target: Target, prompts: Sequence[str], max_tokens: Sequence[int], deadline: float, seed: int,
                  out: list[Sent]) -> None:
    rng = np.random.default_rng(seed)
    n = 0
    while time.perf_counter() < deadline:
        prompt = prompts[int(rng.integers(len(prompts)))]
        tokens = int(max_tokens[int(rng.integers(len(max_tokens)))])
        out.append(Sent(tokens, await target.send(f"c{seed}-{n}", prompt, tokens)))
        n += 1


async def run_level(target: Target, prompts: Sequence[str], max_tokens: Sequence[int], clients: int,
                    duration: float, round_no: int) -> LevelRun:
    """`clients` clients back to back for `duration` seconds; the wall time runs to the last answer.
    Client c of round r draws from seed 1000 r + c, so both servers get the same requests."""
    sent: list[Sent] = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(target, prompts, max_tokens, start + duration, 1000 * round_no + c, sent)
                           for c in range(clients)))
    return LevelRun(target.name, clients, round_no, sent, time.perf_counter() - start)


@dataclass(frozen=True, slots=True)
class LevelResult:
    """A level on a server over all rounds: requests pooled, throughput = all tokens / all wall time."""

    server: str
    concurrency: int
    requests: int
    failed: int
    output_tokens: int  # as the server reported them (usage.completion_tokens)
    arrivals: int  # token messages (WebSocket) or content chunks (SSE) that reached the client
    requested_tokens: int  # sum of max_tokens of the requests that succeeded
    tokens_per_s: float
    round_tokens_per_s: list[float]
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    errors: list[str]  # the first few failures' messages


def summarize(runs: Sequence[LevelRun]) -> LevelResult:
    sent = [s for run in runs for s in run.sent]
    ok = [s for s in sent if s.result.ok]
    tokens = sum(s.result.output_tokens for s in ok)
    per_round = [round(sum(s.result.output_tokens for s in run.sent if s.result.ok) / run.wall_s, 1)
                 for run in runs]
    errors = [json.dumps(s.result.final)[:300] for s in sent if not s.result.ok][:5]
    return LevelResult(
        runs[0].server, runs[0].concurrency, len(sent), len(sent) - len(ok), tokens,
        sum(s.result.tokens for s in ok), sum(s.max_tokens for s in ok),
        round(tokens / sum(run.wall_s for run in runs), 1), per_round,
        percentiles([s.result.ttft_s for s in ok]), percentiles([g for s in ok for g in s.result.itl_s]), errors,
    )


@dataclass(frozen=True, slots=True)
class Ratio:
    concurrency: int
    measure: str  # tokens_per_s, ttft_p50 or itl_p95
    streamgen: float
    llama_server: float
    ratio: float  # streamgen / llama-server
    target: str  # e.g. ">= 2.0x"
    met: bool


def ratios(results: Sequence[LevelResult]) -> list[Ratio]:
    """The issue's targets, for the levels that both servers ran."""
    rows = {(r.server, r.concurrency): r for r in results}
    out = []
    for level, measure, direction, target in TARGETS:
        ours, theirs = rows.get((STREAMGEN, level)), rows.get((LLAMA, level))
        if ours is None or theirs is None:
            continue
        a, b = _measure(ours, measure), _measure(theirs, measure)
        ratio = a / b if b else float("nan")
        met = ratio >= target if direction == ">=" else ratio <= target
        out.append(Ratio(level, measure, a, b, round(ratio, 3), f"{direction} {target}x", bool(met)))
    return out


def _measure(r: LevelResult, measure: str) -> float:
    if measure == "tokens_per_s":
        return r.tokens_per_s
    field, p = measure.split("_")
    return (r.ttft_ms if field == "ttft" else r.itl_ms)[p]


@dataclass(slots=True)
class Together:
    requests: int
    tokens: int  # max_tokens of each
    prompt_tokens: list[int]  # each request's prompt with the chat template
    engine_tok_s: list[float]  # per round
    server_tok_s: list[float]
    llama_tok_s: list[float]
    failed: int = 0

    @property
    def share(self) -> float:
        """The server's aggregate tokens/s as a share of the engine's (medians over the rounds)."""
        return statistics.median(self.server_tok_s) / statistics.median(self.engine_tok_s)


def burst_rate(results: Sequence[Streamed]) -> float:
    """Aggregate output tokens/s of requests sent together: all tokens / (last arrival - first send)."""
    ok = [r for r in results if r.ok]
    if not ok:
        return 0.0
    return sum(r.output_tokens for r in ok) / (max(r.stamps[-1] for r in ok) - min(r.sent for r in results))


class OfflineEngine:
    """The same requests through `generate()` in this process, on a runner with the server's slot count and
    the server's scheduler limits."""

    def __init__(self, directory: Path, threads: int, slots: int, prefix_cache: bool) -> None:
        from streamgen.engine.device import Device
        from streamgen.engine.loader import load_model
        from streamgen.engine.slots import SlotConfig

        self.model = load_model(directory, Device("cpu"), threads, SlotConfig(max_batch=slots))
        self.slots = slots
        self.prefix_cache = prefix_cache

    def requests(self, prompts: Sequence[str], tokens: int, chat: bool = True) -> list:
        from streamgen.engine.params import SamplingParams
        from streamgen.engine.request import prepare_request
        from streamgen.engine.tokenizer import ChatMessage

        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        return [prepare_request(self.model.tokenizer, self.model.context_length, params,
                                **({"messages": [ChatMessage("user", p)]} if chat else {"prompt": p}))
                for p in prompts]

    def run(self, requests: Sequence) -> float:
        """Aggregate tokens/s: every token / (last token - start)."""
        from streamgen.engine.generate import generate
        from streamgen.engine.request import TokenEvent

        start, last, count = time.perf_counter(), 0.0, 0
        from streamgen.engine.config import EngineConfig
        from streamgen.engine.scheduler import SchedulerLimits

        # The server's scheduling (its default latency target included), so that the two differ in serving only.
        limits = SchedulerLimits.from_config(EngineConfig(max_batch=self.slots, prefix_cache=self.prefix_cache))
        for event in generate(self.model.runner, self.model.tokenizer, requests, limits=limits,
                              prefix_cache=self.prefix_cache):
            if isinstance(event, TokenEvent):
                count += 1
                last = time.perf_counter()
        return count / (last - start)

    def warm_up(self) -> None:
        """As the server warms up before it is ready (engine/warmup.py): a cold engine reached half its warm
        rate with 16 requests at once."""
        from streamgen.engine.warmup import warm_up

        warm_up(self.model.runner, self.model.tokenizer)


async def burst(target_name: str, url_or_ws: str, prompts: Sequence[str], tokens: int, transport: str,
                 cache_prompt: bool, chat: bool = True) -> list[Streamed]:
    if target_name == STREAMGEN and transport == "websocket":
        return await websocket_together(url_or_ws, together_frames(prompts, tokens, chat))
    bodies = ([streamgen_body(p, tokens, chat) for p in prompts] if target_name == STREAMGEN
              else [llama_body(p, tokens, cache_prompt, chat) for p in prompts])
    return list(await asyncio.gather(*(sse_request(url_or_ws, b, openai_path(chat)) for b in bodies)))
