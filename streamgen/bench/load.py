"""`streamgen bench load`: concurrent WebSocket clients against real servers.

Two `streamgen serve` processes run side by side on loopback: one with
continuous batching (--max-batch slots) and the baseline with batching off
(one slot). For each concurrency level, first one then the other is driven
by N clients; each client sends requests back to back for the level's
duration, with a mix of prompt lengths (about 16, 64 and 256 tokens) and
output lengths (32, 64 and 128 tokens, end of sequence ignored).

Per level and server: time to first token p50/p95/p99 (client-measured, queue
included), inter-token latency p50/p95/p99, aggregate output tokens/s, failed
requests, and what a million output tokens cost at --price-per-hour: the
answers' own usage.cost_usd (each request's share of the engine's busy time)
added up over the level, divided by their tokens; the servers' idle time is
charged to no one. Writes a JSON file and a PNG plot.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from streamgen.bench.clients import Streamed, percentiles, websocket_request
from streamgen.bench.common import ServeProcess, serve_args
from streamgen.bench.quality import load_texts

LEVELS = (1, 4, 16, 32)
PROMPT_WORDS = (12, 48, 190)  # about 16, 64 and 256 tokens
OUTPUT_TOKENS = (32, 64, 128)


@dataclass(frozen=True, slots=True)
class LevelResult:
    server: str
    concurrency: int
    requests: int
    failed: int
    output_tokens: int
    tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    cost_per_million_tokens_usd: float | None = None  # from the answers' usage.cost_usd


async def _client(url: str, prompts: list[str], deadline: float, seed: int, out: list[Streamed]) -> None:
    rng = np.random.default_rng(seed)
    n = 0
    while time.perf_counter() < deadline:
        prompt = prompts[int(rng.integers(len(prompts)))]
        max_tokens = int(OUTPUT_TOKENS[int(rng.integers(len(OUTPUT_TOKENS)))])
        out.append(await websocket_request(url, {"type": "generate", "id": f"c{seed}-{n}", "prompt": prompt, "params": {
            "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}}))
        n += 1


async def _level(url: str, prompts: list[str], clients: int, duration: float) -> tuple[list[Streamed], float]:
    results: list[Streamed] = []
    start = time.perf_counter()
    await asyncio.gather(*(_client(url, prompts, start + duration, seed, results) for seed in range(clients)))
    return results, time.perf_counter() - start


def summarize(server: str, clients: int, results: list[Streamed], wall_s: float) -> LevelResult:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    return LevelResult(
        server, clients, len(results), len(results) - len(ok), tokens, round(tokens / wall_s, 1),
        percentiles([r.ttft_s for r in ok]), percentiles([g for r in ok for g in r.itl_s]), cost_per_million(ok),
    )


def cost_per_million(results: list[Streamed]) -> float | None:
    """USD per million output tokens: the answers' usage.cost_usd (their shares of the engine's busy time at the
    server's --price-per-hour) over their usage.completion_tokens; None when the server reports no cost."""
    usages = [r.final.get("usage") or {} for r in results]
    if not usages or any("cost_usd" not in u for u in usages):
        return None
    tokens = sum(u.get("completion_tokens", 0) for u in usages)
    return round(sum(u["cost_usd"] for u in usages) / tokens * 1e6, 4) if tokens else None


def _prompts() -> list[str]:
    words = " ".join(load_texts() * 4).split()
    return [" ".join(words[i * 5 : i * 5 + n]) for n in PROMPT_WORDS for i in range(3)]


def plot(results: list[LevelResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server, style in (("batching", "o-"), ("batching off", "s--")):
        rows = [r for r in results if r.server == server]
        levels = [r.concurrency for r in rows]
        left.plot(levels, [r.tokens_per_s for r in rows], style, label=server)
        right.plot(levels, [r.itl_ms["p95"] for r in rows], style, label=f"{server}: inter-token p95")
        right.plot(levels, [r.ttft_ms["p95"] for r in rows], style, alpha=0.45, label=f"{server}: first token p95")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="aggregate output tokens/s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="Latency (p95)")
    for ax in (left, right):
        ax.set_xticks(LEVELS, [str(x) for x in LEVELS])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_load_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    ensure_model(args.model, args.quantize, args.home)
    common = [*serve_args(args), "--max-queued", "256", "--max-requests-per-connection", "1", "--rate-limit", "0",
              "--price-per-hour", str(args.price_per_hour)]
    servers = [ServeProcess("batching", [*common, "--max-batch", str(args.max_batch)]),
               ServeProcess("batching off", [*common, "--max-batch", "1"])]
    prompts = _prompts()
    results: list[LevelResult] = []
    try:
        for server in servers:
            server.wait_ready()
        for clients in args.levels:
            for server in servers:
                raw, wall = asyncio.run(_level(server.ws_url, prompts, clients, args.duration))
                row = summarize(server.name, clients, raw, wall)
                results.append(row)
                print(f"  {server.name:13s} {clients:3d} clients: {row.tokens_per_s:7.1f} tok/s, "
                      f"ttft p50 {row.ttft_ms['p50']:8.1f} ms, itl p95 {row.itl_ms['p95']:7.1f} ms, "
                      f"{row.requests} requests, {row.failed} failed, {_usd(row.cost_per_million_tokens_usd)} per "
                      "million tokens", file=sys.stderr, flush=True)
    finally:
        for server in servers:
            server.stop()
    _report(results, args)
    return 0


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:.4g}"


def _report(results: list[LevelResult], args) -> None:
    print(f"\nstreamgen bench load: {args.model} ({args.quantize}), {args.duration:.0f} s per level and server, "
          f"batching = {args.max_batch} slots, batching off = 1 slot; cost at ${args.price_per_hour:g} an hour, from "
          "the answers' usage.cost_usd\n")
    print("| server | clients | requests | failed | output tok/s | TTFT p50/p95/p99 (ms) | inter-token p50/p95/p99 (ms) "
          "| USD per million output tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        t, i = r.ttft_ms, r.itl_ms
        print(f"| {r.server} | {r.concurrency} | {r.requests} | {r.failed} | {r.tokens_per_s} | "
              f"{t['p50']:.0f} / {t['p95']:.0f} / {t['p99']:.0f} | {i['p50']:.1f} / {i['p95']:.1f} / {i['p99']:.1f} | "
              f"{_usd(r.cost_per_million_tokens_usd)} |")
    on = {r.concurrency: r for r in results if r.server == "batching"}
    off = {r.concurrency: r for r in results if r.server == "batching off"}
    if 1 in on and 16 in on and 16 in off:
        print()
        print(f"- aggregate at 16 / single stream: {on[16].tokens_per_s / on[1].tokens_per_s:.2f}x (target >= 5x)")
        print(f"- aggregate at 16, batching / batching off: {on[16].tokens_per_s / off[16].tokens_per_s:.2f}x "
              "(target >= 4x)")
        print(f"- inter-token p95 at 16 / single-stream median: {on[16].itl_ms['p95'] / on[1].itl_ms['p50']:.2f}x "
              "(target <= 3x)")
        print(f"- failed requests: {sum(r.failed for r in results)}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
        print(f"\nplot: {args.plot}")
