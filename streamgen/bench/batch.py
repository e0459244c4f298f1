"""`streamgen bench batch`: the batch runner against concurrent WebSocket clients, on the same requests.

Mixed workload: --requests requests drawn as bench load draws them (prompts of about 16, 64 and 256
tokens, 32, 64 or 128 output tokens, greedy, end of sequence ignored), each cut to fit the model's context.
- batch: `streamgen batch`'s own code (run_file on a JSONL file of /v1/completions requests) in this
  process, with --max-batch slots;
- websocket: a `streamgen serve` process with the same slots, driven by --clients WebSocket clients that
  take the same requests from one shared queue (bench/clients.py's client, a connection per request, as
  bench load sends them).
Rounds alternate which side goes first. Output tokens/s is completion tokens over the run's wall time,
the model's loading left out on both sides. Target: batch at least 1.3x the WebSocket clients.

Decode-heavy mix: --decode-requests requests of a short prompt and 128 output tokens through the runner,
against the raw batch-16 decode rate of the same build (bench speed's measurement: 16 rows decoded
together and nothing else). Target: at least 90 % of it.

Orders: --order-requests questions about a few documents each (a document as the system prompt, a short
question, 16 output tokens), shuffled, through the runner in each order (options.ORDERS), slots emptied
before each run: the share of prompt tokens the prefix cache gave, and tokens/s.

Costs: both sides report what a million output tokens cost at --price-per-hour, from the answers' own
usage.cost_usd (each request's share of the engine's busy time).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamgen.batch.options import ORDERS, BatchOptions
from streamgen.batch.loop import run_file
from streamgen.bench.clients import Streamed, websocket_request
from streamgen.bench.common import ServeProcess, serve_args
from streamgen.bench.load import OUTPUT_TOKENS, _prompts, cost_per_million
from streamgen.bench.quality import load_texts
from streamgen.bench.speed import BATCH, SlotContender, bench_prompts
from streamgen.engine.config import EngineConfig
from streamgen.engine.device import Device
from streamgen.engine.loader import LoadedModel, load_model
from streamgen.engine.slots import SlotConfig
from streamgen.engine.tokenizer import ChatMessage
from streamgen.server.openai_schema import CHAT_PATH, COMPLETIONS_PATH
from streamgen.telemetry.setup import Telemetry

DECODE_TOKENS = 128
DECODE_PROMPT_WORDS = 12
QUESTIONS_PER_DOCUMENT = 4
DOCUMENT_WORDS = 120


@dataclass(frozen=True, slots=True)
class Run:
    side: str
    requests: int
    failed: int
    output_tokens: int
    wall_s: float
    cost_per_million_tokens_usd: float | None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0


def mixed_bodies(model: LoadedModel, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """bench load's request mix, as /v1/completions bodies that fit the model's context."""
    prompts, rng = _prompts(), np.random.default_rng(seed)
    return [_fitted(model, prompts[int(rng.integers(len(prompts)))],
                    int(OUTPUT_TOKENS[int(rng.integers(len(OUTPUT_TOKENS)))])) for _ in range(count)]


def decode_bodies(model: LoadedModel, count: int) -> list[dict[str, Any]]:
    """Short different prompts, long outputs: a mix where decoding is nearly all the work."""
    words = " ".join(load_texts()).split()
    return [_fitted(model, " ".join(words[i * 3 : i * 3 + DECODE_PROMPT_WORDS]), DECODE_TOKENS) for i in range(count)]


def document_bodies(model: LoadedModel, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Questions about a few documents, shuffled: each document is the system prompt its questions share."""
    words, rng = " ".join(load_texts() * 4).split(), np.random.default_rng(seed)
    bodies = []
    for i in range(count):
        doc = words[i // QUESTIONS_PER_DOCUMENT * 17 :][:DOCUMENT_WORDS]
        while True:
            messages = [ChatMessage("system", "Answer from this text. " + " ".join(doc)),
                        ChatMessage("user", f"Question {i % QUESTIONS_PER_DOCUMENT + 1}?")]
            if len(doc) <= 1 or len(model.tokenizer.encode(model.tokenizer.render_chat(messages))) + 16 <= \
                    model.context_length:
                break
            doc = doc[: len(doc) * 3 // 4]
        bodies.append({"messages": [{"role": m.role, "content": m.content} for m in messages], "max_tokens": 16,
                       "temperature": 0, "ignore_eos": True})
    return [bodies[int(i)] for i in rng.permutation(len(bodies))]


def _fitted(model: LoadedModel, prompt: str, max_tokens: int) -> dict[str, Any]:
    """Cut the prompt (and, on a tiny context, the output) until prompt + output fit the context."""
    context = model.context_length
    max_tokens = min(max_tokens, context // 2)
    words = prompt.split()
    while len(words) > 1 and len(model.tokenizer.encode(" ".join(words))) + max_tokens > context:
        words = words[: len(words) * 3 // 4]
    return {"prompt": " ".join(words), "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def run_batch(model: LoadedModel, config: EngineConfig, bodies: list[dict[str, Any]], workdir: Path, name: str,
              options: BatchOptions) -> Run:
    """The bodies through `streamgen batch`'s run_file, from a JSONL file to a fresh output file."""
    source, output = workdir / f"{name}.jsonl", workdir / f"{name}.out.jsonl"
    source.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                          "url": CHAT_PATH if "messages" in body else COMPLETIONS_PATH,
                                          "body": body}) + "\n" for i, body in enumerate(bodies)))
    output.unlink(missing_ok=True)
    telemetry = Telemetry.from_env()  # traced as the server process is: by the same OTEL_* variables
    telemetry.model_name, telemetry.price_per_hour = model.name, options.price_per_hour
    try:
        summary = run_file(str(source), output, model, config, telemetry, options)
    finally:
        telemetry.shutdown()
    t = summary.tally
    cost = summary.cost_usd
    per_million = round(cost / t.output_tokens * 1e6, 4) if cost is not None and t.output_tokens else None
    return Run("batch", t.written, t.failed, t.output_tokens, summary.wall_s, per_million, t.prompt_tokens,
               t.cached_tokens)


async def _websocket(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[list[Streamed], float]:
    queue = deque({"type": "generate", "id": f"r{i}", "prompt": b["prompt"],
                   "params": {k: v for k, v in b.items() if k != "prompt"}} for i, b in enumerate(bodies))
    results: list[Streamed] = []

    async def client() -> None:
        while queue:
            results.append(await websocket_request(url, queue.popleft()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return results, time.perf_counter() - start


def run_websocket(server: ServeProcess, bodies: list[dict[str, Any]], clients: int) -> Run:
    results, wall = asyncio.run(_websocket(server.ws_url, bodies, clients))
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return Run("websocket", len(results), len(results) - len(ok), tokens, wall, cost_per_million(ok))


def run_batch_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    directory = ensure_model(args.model, args.quantize, args.home)
    config = EngineConfig(max_batch=args.max_batch)
    model = load_model(directory, Device("cpu"), args.threads, SlotConfig.from_config(config))
    options = BatchOptions(args.order, price_per_hour=args.price_per_hour)
    mixed = mixed_bodies(model, args.requests)
    decode = decode_bodies(model, args.decode_requests)
    documents = document_bodies(model, args.order_requests)
    server = ServeProcess("websocket", [*serve_args(args), "--max-batch", str(args.max_batch), "--max-queued",
                                        str(max(64, args.requests)), "--max-requests-per-connection", "1",
                                        "--rate-limit", "0", "--price-per-hour", str(args.price_per_hour)])
    runs: dict[str, list[Run]] = {"batch": [], "websocket": [], "decode": [], **{o: [] for o in ORDERS}}
    raw: list[float] = []
    with tempfile.TemporaryDirectory(prefix="streamgen-bench-batch-") as tmp:
        workdir = Path(tmp)
        try:
            run_batch(model, config, mixed[: args.max_batch], workdir, "warm-up", options)  # the server warms up too
            server.wait_ready()
            for round_no in range(args.rounds):
                sides = ["batch", "websocket"] if round_no % 2 == 0 else ["websocket", "batch"]
                for side in sides:
                    run = (run_batch(model, config, mixed, workdir, "mixed", options) if side == "batch"
                           else run_websocket(server, mixed, args.clients))
                    runs[side].append(run)
                    _progress(f"round {round_no + 1} {side}", run)
                if decode:
                    runs["decode"].append(run_batch(model, config, decode, workdir, "decode", options))
                    _progress(f"round {round_no + 1} decode-heavy batch", runs["decode"][-1])
                    raw.append(_raw_batch16(directory, args.threads, model))
                    print(f"  round {round_no + 1} raw batch-{BATCH} decode: {raw[-1]:.1f} tok/s", file=sys.stderr,
                          flush=True)
                for order in ORDERS if documents else ():
                    _empty_slots(model)
                    runs[order].append(run_batch(model, config, documents, workdir, f"order-{order}",
                                                 BatchOptions(order, price_per_hour=args.price_per_hour)))
                    _progress(f"round {round_no + 1} order {order} ({_cached(runs[order][-1])} cached)",
                              runs[order][-1])
        finally:
            server.stop()
    _report(runs, raw, args)
    return 0


def _empty_slots(model: LoadedModel) -> None:
    """Forget what the slots hold, so a run starts with a cold prefix cache (a claim empties a slot)."""
    table = model.runner.table
    for slot in table.free_slots():
        table.claim(slot)
        table.release(slot, keep_contents=False)


def _cached(run: Run) -> str:
    return f"{run.cached_tokens / run.prompt_tokens:.0%}" if run.prompt_tokens else "n/a"


def _raw_batch16(directory: Path, threads: int, model: LoadedModel) -> float:
    """bench speed's batch-16 aggregate decode rate of the same build."""
    contender = SlotContender("gqa", directory, threads)
    return contender.batch16(bench_prompts(model.tokenizer)[2])


def _progress(what: str, run: Run) -> None:
    print(f"  {what}: {run.tokens_per_s:.1f} tok/s, {run.requests} requests, {run.failed} failed, "
          f"{run.wall_s:.1f} s", file=sys.stderr, flush=True)


def _median(runs: list[Run]) -> float:
    return statistics.median(r.tokens_per_s for r in runs)


def _report(runs: dict[str, list[Run]], raw: list[float], args) -> None:
    batch, ws = _median(runs["batch"]), _median(runs["websocket"])
    print(f"\nstreamgen bench batch: {args.model} ({args.quantize}), {args.requests} requests of mixed lengths, "
          f"{args.max_batch} slots both ways, {args.clients} WebSocket clients, order {args.order}, "
          f"{args.rounds} interleaved rounds (medians); cost at ${args.price_per_hour:g} an hour\n")
    print("| side | output tok/s | per round | failed | USD per million output tokens |")
    print("|---|---|---|---|---|")
    for side, label in (("batch", "batch runner"), ("websocket", f"{args.clients} WebSocket clients"),
                        ("decode", "batch runner, decode-heavy")):
        if runs[side]:
            rounds = ", ".join(f"{r.tokens_per_s:.1f}" for r in runs[side])
            costs = [r.cost_per_million_tokens_usd for r in runs[side] if r.cost_per_million_tokens_usd is not None]
            cost = f"${statistics.median(costs):.4g}" if costs else "n/a"
            print(f"| {label} | {_median(runs[side]):.1f} | {rounds} | {sum(r.failed for r in runs[side])} | "
                  f"{cost} |")
    print()
    print(f"- batch / WebSocket clients: {batch / ws:.2f}x (target >= 1.3x)")
    result = {"runs": {side: [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in rs] for side, rs in runs.items()},
              "batch_over_websocket": round(batch / ws, 3)}
    if runs["decode"] and raw:
        share = _median(runs["decode"]) / statistics.median(raw)
        print(f"- decode-heavy batch / raw batch-{BATCH} decode ({statistics.median(raw):.1f} tok/s): {share:.0%} "
              "(target >= 90 %)" + ("" if args.max_batch == BATCH else f"; the runner has {args.max_batch} slots"))
        result |= {"raw_batch16_tok_s": raw, "decode_over_raw": round(share, 3)}
    if runs[ORDERS[0]]:
        print(f"\nOrders, on {args.order_requests} questions about {args.order_requests // QUESTIONS_PER_DOCUMENT} "
              "documents (shuffled), slots emptied before each run:\n")
        print("| order | prompt tokens from the prefix cache | output tok/s |")
        print("|---|---|---|")
        for order in ORDERS:
            print(f"| {order} | {_cached(runs[order][0])} | {_median(runs[order]):.1f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
