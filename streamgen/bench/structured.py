"""`streamgen bench structured`: JSON schemas held by the grammar, against free decoding and llama.cpp's server.

The corpus (structured_corpus.json, written for this benchmark: nested objects,
arrays with bounds, enums, numbers with ranges, string patterns and formats,
anyOf, optional fields, $ref; each with a prompt) runs through
`streamgen serve` as chat requests with `response_format: json_schema`
(strict), and through `llama-server` on the same GGUF when one is given.

1. Compile time: every schema compiled afresh against the model's tokenizer,
   in this process (p50, p99).
2. Validity: every answer parsed and validated against its schema
   (jsonschema), greedy and sampled (temperature 1, --seeds seeds), on both
   servers; an answer max_tokens cut (finish_reason "length") is counted
   apart from a finished one that does not validate.
3. Mask time per token: the engine in this process decodes the corpus
   greedily with one constrained row per step (p50, p99 of a step's masks).
4. Decode rate, constrained against free, at each --levels concurrency:
   the same prompts with the schema, and without it for as many tokens as
   the constrained answer had (end of sequence ignored), in interleaved
   rounds; tokens after the first (as the server counted them) over the time they took, per request,
   then the mean; the ratio constrained / free. llama-server gets the
   constrained half too, and the ratio streamgen / llama-server.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from streamgen.bench.clients import Streamed, decode_rate, sse_request
from streamgen.bench.common import LoggedServe, serve_args
from streamgen.bench.llama_server import LlamaServer, llama_server_version, peer_gguf, resolve_llama_server

STREAMGEN, LLAMA = "streamgen", "llama-server"
TARGETS = {"validity": 1.0, "constrained_vs_free": 0.95, "compile_p99_ms": 50.0, "vs_llama": 1.0}


def corpus() -> list[dict[str, Any]]:
    return json.loads(resources.files("streamgen.bench").joinpath("structured_corpus.json").read_text())


def request_body(entry: dict[str, Any], *, constrained: bool, temperature: float, seed: int, max_tokens: int,
                 ignore_eos: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "bench", "messages": [{"role": "user", "content": entry["prompt"]}],
                            "max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": entry["name"], "schema": entry["schema"], "strict": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def valid(entry: dict[str, Any], text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), entry["schema"],
                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


async def _all(url: str, bodies: list[dict[str, Any]], concurrency: int) -> list[Streamed]:
    """Send every body, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(body: dict[str, Any]) -> Streamed:
        async with gate:
            return await sse_request(url, body)

    return list(await asyncio.gather(*(one(b) for b in bodies)))


def run_structured_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    binary = resolve_llama_server(args.llama_server, os.environ)
    directory = ensure_model(args.model, args.quantize, args.home)
    entries = corpus()[: args.schemas] if args.schemas else corpus()
    report: dict[str, Any] = {"model": args.model, "quantize": args.quantize, "schemas": len(entries),
                              "seeds": args.seeds, "max_tokens": args.max_tokens, "levels": args.levels,
                              "rounds": args.rounds, "threads": args.threads, "llama_server": None}
    report["compile"] = _compile_times(directory, entries)
    _log(f"compile: p50 {report['compile']['p50_ms']} ms, p99 {report['compile']['p99_ms']} ms")
    report["mask"] = _mask_times(directory, entries, args)
    _log(f"masks: p50 {report['mask']['p50_ms']} ms, p99 {report['mask']['p99_ms']} ms a token")
    tmp = tempfile.TemporaryDirectory(prefix="streamgen-structured-")
    servers: dict[str, Any] = {}
    try:
        servers[STREAMGEN] = LoggedServe("streamgen", [*serve_args(args), "--max-batch", str(max(args.levels)),
                                                       "--rate-limit", "0", "--max-queued", "512",
                                                       "--max-message-bytes", "262144"])
        if binary is not None:
            gguf, pairing = peer_gguf(binary, args, Path(tmp.name))
            servers[LLAMA] = LlamaServer(binary, gguf, context=args.llama_ctx, parallel=args.llama_parallel,
                                         threads=args.threads)
            report["llama_server"] = {"binary": str(binary), "version": llama_server_version(binary),
                                      "gguf": gguf.name, "pairing": pairing}
        for server in servers.values():
            server.wait_ready()
        report["validity"] = {name: _validity(server.url, entries, args) for name, server in servers.items()}
        report["decode"] = _decode(servers, entries, args)
    finally:
        for server in servers.values():
            server.stop()
        tmp.cleanup()
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _compile_times(directory: Path, entries: list[dict[str, Any]]) -> dict[str, Any]:
    from streamgen.engine.grammar import ConstraintSpec, Grammars
    from streamgen.engine.tokenizer import TextTokenizer

    tok = TextTokenizer.from_dir(directory)
    grammars = Grammars(tok._tok.to_str(), tok.vocab_size, tok.stop_token_ids)  # noqa: SLF001 - a fresh cache
    times = [grammars.compile(ConstraintSpec("json_schema", e["schema"], "response_format")).compile_ms
             for e in entries]
    return {"p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2),
            "max_ms": round(max(times), 2)}


def _mask_times(directory: Path, entries: list[dict[str, Any]], args) -> dict[str, Any]:
    """The engine in this process, one constrained request at a time: each step's mask time is one token's."""
    from streamgen.engine.core import EngineCore
    from streamgen.engine.device import Device
    from streamgen.engine.grammar import ConstraintSpec
    from streamgen.engine.loader import load_model
    from streamgen.engine.params import SamplingParams
    from streamgen.engine.request import prepare_request
    from streamgen.engine.scheduler import SchedulerLimits
    from streamgen.engine.slots import SlotConfig
    from streamgen.engine.tokenizer import ChatMessage

    model = load_model(directory, Device("cpu"), args.threads, SlotConfig(max_batch=1))
    core = EngineCore(model.runner, model.tokenizer, SchedulerLimits(), prefix_cache=False)
    seconds: list[float] = []
    core.on_masks = seconds.append
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for key, entry in enumerate(entries):
        request = prepare_request(model.tokenizer, model.context_length, params,
                                  messages=[ChatMessage("user", entry["prompt"])],
                                  constraint=ConstraintSpec("json_schema", entry["schema"], "response_format"))
        core.add(request, key)
        while core.has_work:
            core.step()
    ms = np.asarray(seconds) * 1000
    return {"steps": len(seconds), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def _validity(url: str, entries: list[dict[str, Any]], args) -> dict[str, Any]:
    runs = [("greedy", 0.0, 0)] + [(f"t1-seed{s}", 1.0, s) for s in range(args.seeds)]
    out: dict[str, Any] = {}
    for label, temperature, seed in runs:
        bodies = [request_body(e, constrained=True, temperature=temperature, seed=seed, max_tokens=args.max_tokens)
                  for e in entries]
        results = asyncio.run(_all(url, bodies, max(args.levels)))
        failed = [(e["name"], r) for e, r in zip(entries, results) if not (r.ok and valid(e, r.text))]
        # An answer max_tokens cut is not finished: no grammar can close it (a string or a number with no bound
        # can go on), so it is counted apart from a finished answer that does not validate.
        cut = [name for name, r in failed if r.ok and r.finish_reason == "length"]
        invalid = [name for name, r in failed if name not in cut]
        out[label] = {"valid": len(entries) - len(failed), "total": len(entries), "cut": cut, "invalid": invalid}
        _log(f"  {url}: {label}: {len(entries) - len(failed)}/{len(entries)} valid, {len(cut)} cut by max_tokens")
    return out


def _decode(servers: dict[str, Any], entries: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    rows = []
    for level in args.levels:
        chosen = [entries[i % len(entries)] for i in range(max(level, args.requests))]
        rates: dict[str, list[float]] = {f"{name} {kind}": [] for name in servers for kind in ("constrained", "free")}
        for round_no in range(args.rounds):
            order = list(servers.items()) if round_no % 2 == 0 else list(servers.items())[::-1]
            for name, server in order:
                constrained = asyncio.run(_all(server.url, [
                    request_body(e, constrained=True, temperature=0.0, seed=0, max_tokens=args.max_tokens)
                    for e in chosen], level))
                if name != STREAMGEN:
                    rates[f"{name} constrained"] += [r for r in map(decode_rate, constrained) if r]
                    continue
                # Free decoding for as many tokens as each constrained answer had.
                free = asyncio.run(_all(server.url, [
                    request_body(e, constrained=False, temperature=0.0, seed=0, ignore_eos=True,
                                 max_tokens=max(2, c.output_tokens)) for e, c in zip(chosen, constrained)], level))
                rates[f"{name} constrained"] += [r for r in map(decode_rate, constrained) if r]
                rates[f"{name} free"] += [r for r in map(decode_rate, free) if r]
        row = {"concurrency": level, **{k: round(statistics.mean(v), 1) if v else None for k, v in rates.items()}}
        ours = row.get(f"{STREAMGEN} constrained")
        row["constrained_vs_free"] = round(ours / row[f"{STREAMGEN} free"], 3) if ours and row.get(
            f"{STREAMGEN} free") else None
        if row.get(f"{LLAMA} constrained") and ours:
            row["vs_llama"] = round(ours / row[f"{LLAMA} constrained"], 3)
        rows.append(row)
        _log(f"  decode at {level}: {row}")
    return rows


def _print(report: dict[str, Any]) -> None:
    c, m = report["compile"], report["mask"]
    print(f"\nstreamgen bench structured: {report['model']} ({report['quantize']}), {report['schemas']} schemas, "
          f"max_tokens {report['max_tokens']}")
    if llama := report["llama_server"]:
        print(f"llama-server {llama['version']} on {llama['gguf']} ({llama['pairing']})")
    print(f"compile (fresh, this process): p50 {c['p50_ms']} ms, p99 {c['p99_ms']} ms "
          f"(target p99 <= {TARGETS['compile_p99_ms']:g} ms: {'met' if c['p99_ms'] <= TARGETS['compile_p99_ms'] else 'not met'})")
    print(f"masks (one constrained row a step, {m['steps']} steps): p50 {m['p50_ms']} ms, p99 {m['p99_ms']} ms a token")
    print("\n| server | run | valid | cut by max_tokens | finished but invalid |\n|---|---|---|---|---|")
    for name, runs in report["validity"].items():
        for label, v in runs.items():
            print(f"| {name} | {label} | {v['valid']}/{v['total']} | {', '.join(v['cut']) or 0} | "
                  f"{', '.join(v['invalid']) or 0} |")
    print("\n| concurrency | " + " | ".join(k for k in report["decode"][0] if k != "concurrency") + " |")
    print("|---" * len(report["decode"][0]) + "|")
    for row in report["decode"]:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
