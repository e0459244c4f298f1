"""`streamgen bench speculation`: prompt-lookup speculation on against off, and llama.cpp's n-gram modes.

Workloads (WORKLOADS): grounded ones, where the answer repeats its context
(copy a paragraph, summarise a text, extract fields from it, rewrite a code
snippet with one change, fix a bug in a function, a chat that asks to quote
an earlier turn), and an open-ended story, where proposals should rarely be
kept. Every request is greedy, 160 tokens at most.

At each --levels concurrency, L clients each send every workload in turn. The
streamgen server runs once, and each request asks for speculation on
(prompt lookup, max_draft 8, ngram 2-4) or off; llama-server runs once per
--llama-spec mode (off, and its n-gram modes) on the GGUF of the same weights
(bench/llama_server.py, equal_weights_gguf: F32 against the fp32 build,
the model's own GGUF against `source`). Rounds are interleaved, alternating the order.

First, in this process: how often the two ways a token can be computed
disagree. Each workload is decoded greedily, one token a step (GQA's decode
path), and the same tokens are then run through verification passes of
max_draft + 1 tokens (its prompt path): the positions compared, how many
have a different argmax, and the largest logit difference.

Reported per workload, level and contender: the decode rate at the client
(tokens after the first over the time they took, the mean over requests)
and the aggregate output tokens/s; for streamgen with speculation, the share
of proposed tokens kept; the ratios speculation on / off and streamgen / the
best llama-server mode.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from streamgen.bench.clients import Streamed, decode_rate, sse_request
from streamgen.bench.common import LoggedServe, serve_args
from streamgen.bench.llama_server import LlamaServer, llama_server_version, peer_gguf, resolve_llama_server

MAX_TOKENS = 160
SPEC_ON = {"type": "prompt_lookup", "max_draft": 8, "ngram": [2, 4]}
SPEC_OFF = {"type": "off"}
LLAMA_MODES = ("off", "ngram-simple", "ngram-map-k", "ngram-mod", "ngram-cache")
GROUNDED = ("copy", "summarise", "extract", "rewrite code", "fix code", "quote a turn")

PARAGRAPH = ("The lighthouse keeper climbed the narrow stairs every evening at dusk. He lit the great lamp, wiped the "
             "salt from the glass, and watched the ships pass safely beyond the rocks. In forty years he had never "
             "missed a night, not even the winter the storm took the roof off his cottage.")
REPORT = ("On 12 March 2024, Dr. Alice Moreau of the University of Lyon presented the results of the Rhone water "
          "study in Geneva. The study, led with Professor Jan Kowalski of Warsaw, measured river temperatures at "
          "forty stations between 2019 and 2023. The team found that summer temperatures rose by 1.4 degrees, and "
          "recommended new limits for the power plants near Valence and Avignon.")
CODE = '''def total_price(items, tax_rate):
    total = 0
    for item in items:
        total = total + item["price"] * item["quantity"]
    total = total * (1 + tax_rate)
    return round(total, 2)'''
BUGGY = '''def average(numbers):
    total = 0
    for n in numbers:
        total += n
    return total / len(numbers) - 1'''

WORKLOADS: dict[str, list[dict[str, str]]] = {
    "copy": [{"role": "user", "content": f"Copy this paragraph exactly:\n\n{PARAGRAPH}"}],
    "summarise": [{"role": "user", "content": f"Summarise this text, keeping its own words:\n\n{REPORT}"}],
    "extract": [{"role": "user", "content": "List every person, place and date in this text, each with the sentence "
                                            f"it appears in:\n\n{REPORT}"}],
    "rewrite code": [{"role": "user", "content": "Rewrite this function, renaming the variable total to result and "
                                                 f"changing nothing else:\n\n{CODE}"}],
    "fix code": [{"role": "user", "content": f"Fix the bug in this function and give the whole function:\n\n{BUGGY}"}],
    "quote a turn": [
        {"role": "user", "content": "Tell me about lighthouse keepers."},
        {"role": "assistant", "content": PARAGRAPH},
        {"role": "user", "content": "Repeat your last answer word for word, then add one sentence about the lamp."}],
    "story": [{"role": "user", "content": "Write a short story about a dragon who learns to bake bread."}],
}


def body(messages: list[dict[str, str]], speculation: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "bench", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    if speculation is not None:
        out["speculation"] = speculation
    return out


async def _clients(url: str, level: int, make) -> tuple[list[tuple[str, Streamed]], float]:
    """L clients, each sending every workload in turn; (workload, result) pairs and the wall time."""

    async def client(i: int) -> list[tuple[str, Streamed]]:
        names = list(WORKLOADS)
        order = names[i % len(names):] + names[: i % len(names)]  # clients start on different workloads
        return [(name, await sse_request(url, make(WORKLOADS[name]))) for name in order]

    start = time.perf_counter()
    results = await asyncio.gather(*(client(i) for i in range(level)))
    return [r for rs in results for r in rs], time.perf_counter() - start


def run_speculation_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    binary = resolve_llama_server(args.llama_server, os.environ)
    directory = ensure_model(args.model, args.quantize, args.home)
    report: dict[str, Any] = {"model": args.model, "quantize": args.quantize, "levels": args.levels,
                              "rounds": args.rounds, "threads": args.threads, "max_tokens": MAX_TOKENS,
                              "speculation": SPEC_ON, "llama_server": None}
    report["paths"] = path_agreement(directory, args.threads)
    _log(f"paths: {report['paths']}")
    tmp = tempfile.TemporaryDirectory(prefix="streamgen-speculation-")
    contenders: dict[str, tuple[Any, Any]] = {}  # name -> (server, request maker)
    servers: list[Any] = []
    try:
        streamgen = LoggedServe("streamgen", [*serve_args(args), "--max-batch", str(max(args.levels)),
                                              "--rate-limit", "0", "--max-queued", "512", "--prefix-cache", "off"])
        servers.append(streamgen)
        contenders["streamgen, speculation off"] = (streamgen, lambda m: body(m, SPEC_OFF))
        contenders["streamgen, speculation on"] = (streamgen, lambda m: body(m, SPEC_ON))
        if binary is not None:
            gguf, pairing = peer_gguf(binary, args, Path(tmp.name))
            report["llama_server"] = {"binary": str(binary), "version": llama_server_version(binary),
                                      "gguf": gguf.name, "pairing": pairing, "modes": args.llama_spec}
            for mode in args.llama_spec:
                extra = [] if mode == "off" else ["--spec-type", mode]
                server = LlamaServer(binary, gguf, context=args.llama_ctx, parallel=args.llama_parallel,
                                     threads=args.threads, extra=extra)
                servers.append(server)
                contenders[f"llama-server, {mode}"] = (server, lambda m: {**body(m, None), "cache_prompt": False})
        for server in servers:
            server.wait_ready()
        rows = _measure(contenders, args)
    finally:
        for server in servers:
            server.stop()
        tmp.cleanup()
    report["rows"] = rows
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def path_agreement(directory: Path, threads: int) -> dict[str, Any]:
    """The decode path against the verification path on the same tokens: argmax disagreements and the largest
    logit difference, over every workload's greedy answer."""
    import numpy as np

    from streamgen.engine.device import Device
    from streamgen.engine.loader import load_model
    from streamgen.engine.slots import SlotConfig
    from streamgen.engine.tokenizer import ChatMessage

    model = load_model(directory, Device("cpu"), threads, SlotConfig(max_batch=2))
    runner, width = model.runner, SPEC_ON["max_draft"] + 1
    compared = differ = 0
    worst = 0.0
    for messages in WORKLOADS.values():
        prompt = model.tokenizer.encode(model.tokenizer.render_chat([ChatMessage(m["role"], m["content"])
                                                                     for m in messages]))
        steps = min(MAX_TOKENS, model.context_length - len(prompt) - width)
        if steps < width:
            continue  # the prompt does not leave room (a small test model's context)
        plain, checked = runner.allocate(), runner.allocate()
        try:
            logits, tokens, decoded = runner.prefill(plain, prompt), [], []
            for _ in range(steps):
                tokens.append(int(logits.argmax()))
                logits = runner.decode([plain], [tokens[-1]])[0]
                decoded.append(logits)  # after tokens[-1]: the decode path
            runner.prefill(checked, prompt)
            for at in range(0, len(tokens) - width + 1, width):
                verified = runner.verify(checked, tokens[at: at + width])  # the prompt path, same positions
                for i in range(width):
                    compared += 1
                    differ += int(verified[i].argmax() != decoded[at + i].argmax())
                    worst = max(worst, float(np.abs(verified[i] - decoded[at + i]).max()))
        finally:
            runner.free(plain)
            runner.free(checked)
    return {"positions": compared, "argmax_differs": differ, "max_logit_diff": round(worst, 6)}


def _measure(contenders: dict[str, tuple[Any, Any]], args) -> list[dict[str, Any]]:
    rows = []
    for level in args.levels:
        rates: dict[tuple[str, str], list[float]] = {}
        totals: dict[str, list[float]] = {name: [] for name in contenders}
        kept: dict[str, list[int]] = {"accepted": [], "rejected": []}
        for round_no in range(args.rounds):
            names = list(contenders) if round_no % 2 == 0 else list(contenders)[::-1]
            for name in names:
                server, make = contenders[name]
                results, wall = asyncio.run(_clients(server.url, level, make))
                totals[name].append(sum(r.output_tokens for _, r in results if r.ok) / wall)
                for workload, r in results:
                    if (rate := decode_rate(r)) is not None:
                        rates.setdefault((name, workload), []).append(rate)
                    details = (r.final.get("usage") or {}).get("completion_tokens_details") or {}
                    if name.endswith("speculation on") and details:
                        kept["accepted"].append(details["accepted_prediction_tokens"])
                        kept["rejected"].append(details["rejected_prediction_tokens"])
                _log(f"  {level} clients, round {round_no + 1}: {name}: {totals[name][-1]:.1f} tok/s")
        for workload in WORKLOADS:
            row: dict[str, Any] = {"concurrency": level, "workload": workload}
            for name in contenders:
                got = rates.get((name, workload))
                row[name] = round(statistics.mean(got), 1) if got else None
            rows.append(row)
        proposed = sum(kept["accepted"]) + sum(kept["rejected"])
        rows.append({"concurrency": level, "workload": "aggregate tok/s",
                     **{name: round(statistics.median(v), 1) for name, v in totals.items()},
                     "kept share": round(sum(kept["accepted"]) / proposed, 3) if proposed else None})
    for row in rows:
        on, off = row.get("streamgen, speculation on"), row.get("streamgen, speculation off")
        row["on / off"] = round(on / off, 2) if on and off else None
        llamas = [v for k, v in row.items() if k.startswith("llama-server") and isinstance(v, (int, float))]
        if llamas and on:
            row["on / best llama"] = round(on / max(llamas), 2)
            row["off / llama off"] = (round(off / row["llama-server, off"], 2)
                                      if off and row.get("llama-server, off") else None)
    return rows


def _print(report: dict[str, Any]) -> None:
    peer = report["llama_server"]
    print(f"\nstreamgen bench speculation: {report['model']} ({report['quantize']}), greedy, {report['max_tokens']} "
          f"tokens, {report['rounds']} interleaved rounds" + (f"; llama-server {peer['version']} on {peer['gguf']} "
                                                               f"({peer['pairing']})" if peer else ""))
    paths = report["paths"]
    print(f"decode path vs verification path, same tokens: {paths['argmax_differs']} of {paths['positions']} "
          f"positions with another argmax; largest logit difference {paths['max_logit_diff']}")
    print("decode tok/s at the client, per request (mean); aggregate rows: all output over the wall time")
    keys = list(dict.fromkeys(k for row in report["rows"] for k in row if k not in ("concurrency", "workload")))
    print("| clients | workload | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for row in report["rows"]:
        print(f"| {row['concurrency']} | {row['workload']} | " + " | ".join(str(row.get(k, "")) for k in keys) + " |")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
