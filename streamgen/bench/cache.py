"""`streamgen bench cache`: the prefix cache on against off, on real servers.

Two `streamgen serve` processes on loopback, the same build, one with
`--prefix-cache on` and the baseline with `--prefix-cache off`. Rounds
alternate between them (and swap order every round). Three workloads:

- multi-turn: one conversation of 8 turns whose history grows; time to first
  token of each turn (client-measured). Target: turn 8 with the cache at most
  25 % of turn 8 without it.
- shared system prompt: 16 concurrent clients, one ~500-token system prompt,
  a different question each. Target: TTFT p95 at most 50 % of cache off.
- no sharing: 16 clients with random prompts. Target: throughput within 3 %.

Before the servers start, the costs the slot-choice rule weighs are measured
in this process on the same build: a decode step at each width, a prefill
token, a copied token (engine/prefix.py, engine/costs.py).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from streamgen.bench.clients import Streamed, percentiles, websocket_request
from streamgen.bench.common import ServeProcess, serve_args
from streamgen.bench.quality import load_texts

TURNS = ["What is a lighthouse?", "Who kept lighthouses in the past?", "How did they signal ships?",
         "What happens in a storm?", "Write two lines of a poem about it.", "Summarise our talk so far.",
         "What is the most famous lighthouse?", "Thank you. Anything else worth knowing?"]
CLIENTS = 16
WIDTHS = (1, 2, 4, 8, 16)
PASS_TOKENS = (4, 16, 64)  # prompt passes timed alone, in the range a latency target leaves: their fixed cost


@dataclass(frozen=True, slots=True)
class Costs:
    decode_ms: dict[int, float]  # width -> ms per decode step
    row_ms: float  # what one more row adds to a decode step (least squares over the widths)
    prefill_ms_per_token: float
    copy_ms_per_token: float
    prefill_pass_ms: dict[int, float]  # prompt tokens -> ms for one prompt pass of that many, alone
    prefill_pass_fixed_ms: float  # the line through them: what every pass costs before its tokens


@dataclass(slots=True)
class ServerFigures:
    turn_ttft_ms: list[list[float]]  # per round, per turn
    shared_ttft_p95_ms: list[float]  # per round
    shared_cached_tokens: list[float]  # per round, mean per request
    nosharing_tok_s: list[float]  # per round
    failed: int = 0


def measure_costs(directory, threads: int) -> Costs:
    """Per-part step costs on this machine, in this process, from the runner itself."""
    from streamgen.engine.device import Device
    from streamgen.engine.slots import SlotConfig, SlotRunner

    runner = SlotRunner(directory, Device("cpu"), SlotConfig(max_batch=max(WIDTHS), max_context=1024), threads)
    rng = np.random.default_rng(0)
    vocab = runner.info.vocab_size
    # Lengths fit the model's window (the test suite's tiny model has 256 positions) with the decode
    # steps below (12 at each width) on top.
    context, long = min(300, runner.max_context - 12 * len(WIDTHS) - 4), min(256, runner.max_context // 2)
    for slot in range(max(WIDTHS)):
        runner.table.claim(slot)
        runner.prefill(slot, rng.integers(100, vocab, context).tolist())
    decode = {}
    for width in WIDTHS:
        times = []
        for _ in range(12):
            start = time.perf_counter()
            runner.decode(list(range(width)), rng.integers(100, vocab, width).tolist())
            times.append((time.perf_counter() - start) * 1000)
        decode[width] = statistics.median(times[2:])
    row_ms = float(np.polyfit(list(decode), list(decode.values()), 1)[0])
    prefill, copy = [], []
    for _ in range(5):
        slot = 0
        runner.table.release(slot, keep_contents=False)
        runner.table.claim(slot)
        start = time.perf_counter()
        runner.prefill(slot, rng.integers(100, vocab, long).tolist())
        prefill.append((time.perf_counter() - start) * 1000 / long)
        runner.table.release(1, keep_contents=False)
        runner.table.claim(1)
        start = time.perf_counter()
        runner.copy_prefix(slot, 1, long)
        copy.append((time.perf_counter() - start) * 1000 / long)
    passes = {}
    for n in [n for n in PASS_TOKENS if n <= long]:
        times = []
        for _ in range(5):
            runner.table.release(0, keep_contents=False)
            runner.table.claim(0)
            start = time.perf_counter()
            runner.prefill(0, rng.integers(100, vocab, n).tolist())
            times.append((time.perf_counter() - start) * 1000)
        passes[n] = statistics.median(times)
    fixed = float(np.polyfit(list(passes), list(passes.values()), 1)[1])
    return Costs({w: round(v, 2) for w, v in decode.items()}, round(row_ms, 3), round(statistics.median(prefill), 4),
                 round(statistics.median(copy), 5), {n: round(v, 2) for n, v in passes.items()}, round(fixed, 2))


def _chat(rid: str, messages: list[dict], **params) -> dict:
    return {"type": "generate", "id": rid, "messages": messages, "params": {"temperature": 0, **params}}


async def multi_turn(url: str, round_no: int) -> tuple[list[float], int]:
    """TTFT of each turn of one growing conversation."""
    history: list[dict] = []
    ttfts, failed = [], 0
    for turn, question in enumerate(TURNS):
        opener = f"(conversation {round_no}) " if turn == 0 else ""
        history.append({"role": "user", "content": opener + question})
        result = await websocket_request(url, _chat(f"t{turn}", history, max_tokens=64))
        failed += not result.ok
        ttfts.append(result.ttft_s * 1000)
        history.append({"role": "assistant", "content": result.final.get("text", "")})
    return ttfts, failed


def shared_system_prompt() -> str:
    words = " ".join(load_texts()).split()
    return "You answer questions about this text. " + " ".join(words[:380])


async def shared_prompt(url: str, round_no: int, system: str, per_client: int) -> list[Streamed]:
    async def client(c: int) -> list[Streamed]:
        out = []
        for i in range(per_client):
            question = f"Question {round_no}.{c}.{i}: what does the text say about item {c * 7 + i}?"
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            out.append(await websocket_request(url, _chat(f"s{c}-{i}", messages, max_tokens=32, ignore_eos=True)))
        return out

    return [r for rs in await asyncio.gather(*(client(c) for c in range(CLIENTS))) for r in rs]


async def no_sharing(url: str, round_no: int, duration: float) -> tuple[float, int]:
    """Aggregate tok/s of 16 clients whose prompts share nothing."""
    words = " ".join(load_texts()).split()
    results: list[Streamed] = []

    async def client(c: int, deadline: float) -> None:
        rng = np.random.default_rng(1000 * round_no + c)
        n = 0
        while time.perf_counter() < deadline:
            picked = rng.choice(words, size=int(rng.choice([40, 120, 200])))
            prompt = f"{rng.integers(1 << 30)} " + " ".join(picked)  # a unique first token: no shared prefix
            frame = {"type": "generate", "id": f"n{c}-{n}", "prompt": prompt,
                     "params": {"temperature": 0, "max_tokens": int(rng.choice([32, 64, 128])), "ignore_eos": True}}
            results.append(await websocket_request(url, frame))
            n += 1

    start = time.perf_counter()
    await asyncio.gather(*(client(c, start + duration) for c in range(CLIENTS)))
    wall = time.perf_counter() - start
    return sum(r.tokens for r in results if r.ok) / wall, sum(not r.ok for r in results)


def run_cache_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    directory = ensure_model(args.model, args.quantize, args.home)
    print("measuring step costs in this process ...", file=sys.stderr, flush=True)
    costs = measure_costs(directory, args.threads)
    if args.costs_only:
        _report_costs(costs, args)
        if args.json:
            args.json.write_text(json.dumps({"costs": asdict(costs)}, indent=2) + "\n")
        return 0
    common = [*serve_args(args), "--max-batch", "16", "--max-queued", "256", "--max-requests-per-connection", "1",
              "--rate-limit", "0"]
    servers = {"on": ServeProcess("cache on", [*common, "--prefix-cache", "on"]),
               "off": ServeProcess("cache off", [*common, "--prefix-cache", "off"])}
    figures = {name: ServerFigures([], [], [], []) for name in servers}
    system = shared_system_prompt()
    try:
        for server in servers.values():
            server.wait_ready()
        for round_no in range(args.rounds):
            order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
            for name in order:
                ttfts, failed = asyncio.run(multi_turn(servers[name].ws_url, round_no))
                figures[name].turn_ttft_ms.append(ttfts)
                figures[name].failed += failed
            for name in order:
                results = asyncio.run(shared_prompt(servers[name].ws_url, round_no, system, args.per_client))
                ok = [r for r in results if r.ok]
                figures[name].shared_ttft_p95_ms.append(percentiles([r.ttft_s for r in ok])["p95"])
                figures[name].shared_cached_tokens.append(
                    statistics.mean(r.final["usage"]["cached_tokens"] for r in ok) if ok else 0.0)
                figures[name].failed += len(results) - len(ok)
            for name in order:
                rate, failed = asyncio.run(no_sharing(servers[name].ws_url, round_no, args.duration))
                figures[name].nosharing_tok_s.append(rate)
                figures[name].failed += failed
            print(f"  round {round_no + 1}/{args.rounds}: turn 8 TTFT on {figures['on'].turn_ttft_ms[-1][-1]:.0f} ms "
                  f"/ off {figures['off'].turn_ttft_ms[-1][-1]:.0f} ms; shared p95 on "
                  f"{figures['on'].shared_ttft_p95_ms[-1]:.0f} / off {figures['off'].shared_ttft_p95_ms[-1]:.0f} ms; "
                  f"no sharing on {figures['on'].nosharing_tok_s[-1]:.1f} / off "
                  f"{figures['off'].nosharing_tok_s[-1]:.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    _report(costs, figures, args)
    return 0


def _report_costs(costs: Costs, args) -> None:
    print(f"\nStep costs: {args.model} ({args.quantize}), this process (what the slot choice and the scheduler "
          "weigh):\n")
    print("| decode width | " + " | ".join(str(w) for w in costs.decode_ms) + " |")
    print("|---|" + "---|" * len(costs.decode_ms))
    print("| ms per step | " + " | ".join(f"{v:.2f}" for v in costs.decode_ms.values()) + " |")
    print("\n| prompt pass of (tokens) | " + " | ".join(str(n) for n in costs.prefill_pass_ms) + " |")
    print("|---|" + "---|" * len(costs.prefill_pass_ms))
    print("| ms | " + " | ".join(f"{v:.2f}" for v in costs.prefill_pass_ms.values()) + " |")
    print(f"\n- one more row in a decode step: {costs.row_ms:.3f} ms")
    print(f"- a prompt pass costs {costs.prefill_pass_fixed_ms:.2f} ms before its tokens (the line through the "
          "passes above)")
    print(f"- a prefill token: {costs.prefill_ms_per_token:.4f} ms; a copied token: {costs.copy_ms_per_token:.5f} ms "
          f"(copying is {costs.prefill_ms_per_token / max(costs.copy_ms_per_token, 1e-9):.0f}x cheaper)")


def _report(costs: Costs, figures: dict[str, ServerFigures], args) -> None:
    on, off = figures["on"], figures["off"]
    med = statistics.median
    turns_on = [med(r[t] for r in on.turn_ttft_ms) for t in range(len(TURNS))]
    turns_off = [med(r[t] for r in off.turn_ttft_ms) for t in range(len(TURNS))]
    print(f"\nstreamgen bench cache: {args.model} ({args.quantize}), {args.rounds} interleaved rounds, "
          f"medians; {CLIENTS} clients\n")
    _report_costs(costs, args)
    print("\nMulti-turn, time to first token per turn (ms):\n")
    print("| turn | " + " | ".join(str(t + 1) for t in range(len(TURNS))) + " |")
    print("|---|" + "---|" * len(TURNS))
    print("| cache on | " + " | ".join(f"{v:.0f}" for v in turns_on) + " |")
    print("| cache off | " + " | ".join(f"{v:.0f}" for v in turns_off) + " |")
    shared_on, shared_off = med(on.shared_ttft_p95_ms), med(off.shared_ttft_p95_ms)
    rate_on, rate_off = med(on.nosharing_tok_s), med(off.nosharing_tok_s)
    print()
    print(f"- multi-turn, turn 8: {turns_on[-1] / turns_off[-1] * 100:.0f} % of cache off (target <= 25 %)")
    print(f"- shared system prompt, TTFT p95: {shared_on:.0f} ms vs {shared_off:.0f} ms = "
          f"{shared_on / shared_off * 100:.0f} % of cache off (target <= 50 %); cached tokens per request "
          f"{med(on.shared_cached_tokens):.0f}")
    print(f"- no sharing: {rate_on:.1f} vs {rate_off:.1f} tok/s = {rate_on / rate_off * 100:.1f} % of cache off "
          "(target within 3 %)")
    print(f"- failed requests: {on.failed + off.failed}")
    if args.json:
        args.json.write_text(json.dumps({"costs": asdict(costs), "on": asdict(on), "off": asdict(off)}, indent=2) + "\n")
