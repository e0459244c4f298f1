"""`streamgen bench socket`: tokens/s over the transports against the engine alone.

Baseline: the same greedy request run through `generate()` in this process.
Contenders: that request sent to a real `streamgen serve` process over a real
WebSocket, and over the OpenAI-compatible API as an SSE stream
(/v1/chat/completions, stream: true), timed at the client. Rounds rotate the
order of the three; medians and ratios are printed. Shows what the server,
the thread hand-off, the framing and the socket cost per token.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from dataclasses import dataclass

from streamgen.bench.clients import Streamed, sse_request, websocket_request
from streamgen.bench.common import PROMPT, ServeProcess, load_for_bench, serve_args
from streamgen.engine.generate import generate
from streamgen.engine.request import TokenEvent

CONTENDERS = ("engine", "websocket", "sse")


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


def _client_run(streamed: Streamed) -> Run:
    if not streamed.ok:
        raise RuntimeError(f"the server refused the request: {streamed.final}")
    return _rates(streamed.sent, streamed.stamps)


def _run(who: str, model, request, server: ServeProcess, tokens: int) -> Run:
    messages = [{"role": "user", "content": PROMPT}]
    params = {"temperature": 0, "max_tokens": tokens, "ignore_eos": True}
    if who == "engine":
        return _engine_run(model, request)
    if who == "websocket":
        frame = {"type": "generate", "id": "bench", "messages": messages, "params": params}
        return _client_run(asyncio.run(websocket_request(server.ws_url, frame)))
    return _client_run(asyncio.run(sse_request(server.url, {"model": "bench", "messages": messages, **params})))


def run_socket_bench(args) -> int:
    model, request = load_for_bench(args)
    server = ServeProcess("benchmark", serve_args(args))
    runs: dict[str, list[Run]] = {who: [] for who in CONTENDERS}
    try:
        server.wait_ready()
        for who in CONTENDERS:  # warm-up of each path
            _run(who, model, request, server, args.tokens)
        for r in range(args.rounds):
            order = CONTENDERS[r % 3:] + CONTENDERS[: r % 3]
            for who in order:
                runs[who].append(_run(who, model, request, server, args.tokens))
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                f"{who} {runs[who][-1].decode_tok_s:6.1f} tok/s" for who in CONTENDERS), file=sys.stderr, flush=True)
    finally:
        server.stop()

    def med(who: str, field: str) -> float:
        return statistics.median(getattr(r, field) for r in runs[who])

    print(f"\nstreamgen bench socket: {args.model} ({args.quantize}), greedy, {args.tokens} tokens, "
          f"{args.rounds} interleaved rounds, medians\n")
    print("| measure | engine alone | WebSocket | SSE (/v1/chat/completions) | WebSocket / engine | SSE / engine "
          "| SSE / WebSocket |")
    print("|---|---|---|---|---|---|---|")
    for label, field in (("decode tok/s", "decode_tok_s"), ("end-to-end tok/s", "end_to_end_tok_s")):
        e, w, s = med("engine", field), med("websocket", field), med("sse", field)
        print(f"| {label} | {e:.1f} | {w:.1f} | {s:.1f} | {w / e:.2f}x | {s / e:.2f}x | {s / w:.2f}x |")
    print("\ntarget: SSE within 10 % of the WebSocket's decode rate")
    return 0
