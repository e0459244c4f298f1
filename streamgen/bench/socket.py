"""`streamgen bench socket`: tokens/s over the WebSocket against the engine alone.

Baseline: the same greedy request run through `generate()` in this process.
Contender: that request sent to a real `streamgen serve` process over a real
WebSocket, timed at the client. Rounds alternate between the two; medians and
ratios are printed. Shows what the server, the thread hand-off and the socket
cost per token.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass

from streamgen.bench.common import PROMPT, ServeProcess, load_for_bench, serve_args
from streamgen.engine.generate import generate
from streamgen.engine.request import TokenEvent


@dataclass(frozen=True, slots=True)
class Run:
    end_to_end_tok_s: float  # tokens / (last token - request sent)
    decode_tok_s: float  # (tokens - 1) / (last token - first token)


def _rates(sent: float, stamps: list[float]) -> Run:
    n = len(stamps)
    return Run(n / (stamps[-1] - sent), (n - 1) / (stamps[-1] - stamps[0]))


def _engine_run(model, request) -> Run:
    sent = time.perf_counter()
    stamps = [time.perf_counter() for e in generate(model.runner, model.tokenizer, [request]) if isinstance(e, TokenEvent)]
    return _rates(sent, stamps)


async def _socket_run(url: str, tokens: int) -> Run:
    import websockets

    async with websockets.connect(url) as ws:
        msg = {"type": "generate", "id": "bench", "messages": [{"role": "user", "content": PROMPT}],
               "params": {"temperature": 0, "max_tokens": tokens, "ignore_eos": True}}
        sent = time.perf_counter()
        await ws.send(json.dumps(msg))
        stamps = []
        while True:
            m = json.loads(await ws.recv())
            if m["type"] == "token":
                stamps.append(time.perf_counter())
            elif m["type"] in ("done", "error"):
                if m["type"] == "error":
                    raise RuntimeError(f"the server refused the request: {m}")
                return _rates(sent, stamps)


def run_socket_bench(args) -> int:
    model, request = load_for_bench(args)
    server = ServeProcess("benchmark", serve_args(args))
    try:
        server.wait_ready()
        _engine_run(model, request)
        asyncio.run(_socket_run(server.ws_url, args.tokens))  # warm-up of both
        engine_runs, socket_runs = [], []
        for r in range(args.rounds):
            order = ("engine", "socket") if r % 2 == 0 else ("socket", "engine")
            for who in order:
                if who == "engine":
                    engine_runs.append(_engine_run(model, request))
                else:
                    socket_runs.append(asyncio.run(_socket_run(server.ws_url, args.tokens)))
            print(f"  round {r + 1}/{args.rounds}: engine {engine_runs[-1].decode_tok_s:6.1f} tok/s, "
                  f"socket {socket_runs[-1].decode_tok_s:6.1f} tok/s", file=sys.stderr, flush=True)
    finally:
        server.stop()

    def med(runs, field):
        return statistics.median(getattr(r, field) for r in runs)

    print(f"\nstreamgen bench socket: {args.model} ({args.quantize}), greedy, {args.tokens} tokens, "
          f"{args.rounds} interleaved rounds, medians\n")
    print("| measure | engine alone | over WebSocket | ratio |")
    print("|---|---|---|---|")
    for label, field in (("decode tok/s", "decode_tok_s"), ("end-to-end tok/s", "end_to_end_tok_s")):
        e, s = med(engine_runs, field), med(socket_runs, field)
        print(f"| {label} | {e:.1f} | {s:.1f} | {s / e:.2f}x |")
    return 0
