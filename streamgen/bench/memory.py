"""`streamgen bench memory`: what serving costs in memory, against llama.cpp's `llama-server`.

Each server runs as a real process sized for the same users (streamgen:
--max-batch 16 slots of --max-context 2048 tokens; llama-server: -np 16 with
-c 32768 shared by them), one after the other so that neither's load touches
the other's figures. For each, on loopback:

1. start it and send one short request (first connections, warm caches);
2. read its resident memory (VmRSS in /proc/PID/status): "idle";
3. send the load: N requests at once, each a distinct prompt of about 301
   tokens asking for 900 tokens, greedy, end of sequence ignored;
4. read its resident memory again, and its peak (VmHWM): "after the load".

Every streamgen build given by --builds runs the same load, so a KV cache
format is measured beside the others in one run; streamgen's own
/v1/stats breakdown (weights, KV slots) is reported with it. RSS counts what
the process really touched: llama.cpp and numpy both leave untouched pages of
a large allocation unmapped, so a slot's unused positions cost nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamgen.bench.clients import Streamed, sse_request, websocket_request
from streamgen.bench.common import LoggedServe
from streamgen.bench.llama_server import (LlamaServer, default_gguf, llama_server_version, require_gguf,
                                          resolve_llama_server)
from streamgen.bench.peers.workload import LLAMA, llama_body, prompt_words, sized_prompts, streamgen_frame
from streamgen.errors import ConfigError
from streamgen.model_files import Build


@dataclass(frozen=True, slots=True)
class MemoryRow:
    server: str  # "streamgen none-kvint8" or "llama-server"
    idle_mib: float
    after_mib: float
    peak_mib: float
    requests: int
    failed: int
    output_tokens: int
    wall_s: float
    breakdown: dict[str, Any]  # streamgen's /v1/stats memory; llama-server: its command line

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0


def process_mib(pid: int, field: str) -> float:
    """VmRSS or VmHWM of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no {field}")


def _stats_memory(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/v1/stats", timeout=10) as r:
        return json.loads(r.read())["memory"]


async def _all_at_once(send, prompts: list[str], tokens: int) -> list[Streamed]:
    return await asyncio.gather(*(send(f"m{i}", p, tokens) for i, p in enumerate(prompts)))


def _measure(name: str, pid: int, send, prompts: list[str], tokens: int, details) -> MemoryRow:
    warm = asyncio.run(send("warm", prompts[0][:200], 8))
    if not warm.ok:
        raise RuntimeError(f"{name} refused the first request: {json.dumps(warm.final)[:300]}")
    time.sleep(1.0)  # let allocator arenas settle after the warm-up
    idle = process_mib(pid, "VmRSS")
    _log(f"{name}: idle {idle:.0f} MiB; sending {len(prompts)} requests of {tokens} tokens at once ...")
    start = time.perf_counter()
    results = asyncio.run(_all_at_once(send, prompts, tokens))
    wall = time.perf_counter() - start
    row = MemoryRow(name, round(idle, 1), round(process_mib(pid, "VmRSS"), 1), round(process_mib(pid, "VmHWM"), 1),
                    len(results), sum(not r.ok for r in results),
                    sum(r.output_tokens for r in results if r.ok), round(wall, 1), details())
    _log(f"{name}: after {row.after_mib:.0f} MiB, peak {row.peak_mib:.0f} MiB, {row.tokens_per_s:.1f} tok/s, "
         f"{row.failed} failed")
    return row


def run_memory_bench(args) -> int:
    from streamgen.engine.tokenizer import TextTokenizer
    from streamgen.models.pull import ensure_model

    if not Path("/proc/self/status").exists():
        raise ConfigError("bench memory reads /proc/PID/status, which this system lacks (Linux only)")
    try:
        builds = [Build.from_label(label) for label in args.builds.split(",")]
    except ValueError as exc:
        raise ConfigError(f"--builds: {exc}") from None
    binary = resolve_llama_server(args.llama_server, os.environ)
    if binary is not None:
        require_gguf(args.model, args.gguf)
    directories = {b.label: ensure_model(args.model, b, args.home, graph="gqa") for b in builds}
    tokenizer = TextTokenizer.from_dir(next(iter(directories.values())))
    prompts = sized_prompts(tokenizer.encode, [args.prompt_tokens] * args.requests, prompt_words(), stride=97)
    if len(set(prompts)) < len(prompts):
        raise ConfigError("the prompts are not all distinct: ask for fewer --requests or --prompt-tokens")
    config: dict[str, Any] = {
        "model": args.model, "builds": [b.label for b in builds], "requests": args.requests,
        "prompt_tokens": [len(tokenizer.encode(p)) for p in prompts], "max_tokens": args.max_tokens,
        "max_batch": args.max_batch, "max_context": args.max_context, "threads": args.threads, "llama_server": None,
    }
    rows = []
    for build in builds:
        flags = ["--model", args.model, "--device", "cpu", "--threads", str(args.threads), "--log-level", "warning",
                 *(["--home", args.home] if args.home else []), "--quantize", build.quantization, "--precision", build.precision,
                 "--kv-cache", build.kv_cache, "--max-batch", str(args.max_batch), "--max-context",
                 str(args.max_context), "--max-queued", str(args.requests), "--max-requests-per-connection", "1",
                 "--rate-limit", "0"]
        server = LoggedServe(f"streamgen {build.label}", flags)
        try:
            server.wait_ready()
            send = (lambda s: lambda rid, p, n: websocket_request(s.ws_url, streamgen_frame(rid, p, n)))(server)
            rows.append(_measure(server.name, server.proc.pid, send, prompts, args.max_tokens,
                                 lambda s=server: _stats_memory(s.url)))
        finally:
            server.stop()
    if binary is not None:
        with tempfile.TemporaryDirectory(prefix="streamgen-memory-") as tmp:
            gguf = Path(args.gguf) if args.gguf else default_gguf(args.home, Path(tmp), args.model)
            llama = LlamaServer(binary, gguf, context=args.llama_ctx, parallel=args.llama_parallel,
                                threads=args.threads)
            config["llama_server"] = {"binary": str(binary), "version": llama_server_version(binary),
                                      "gguf": gguf.name, "command": " ".join(llama.command[1:])}
            try:
                llama.wait_ready()
                send = (lambda rid, p, n: sse_request(llama.url, llama_body(p, n, cache_prompt=False)))
                rows.append(_measure(LLAMA, llama.proc.pid, send, prompts, args.max_tokens,
                                     lambda: {"command": config["llama_server"]["command"]}))
            finally:
                llama.stop()
    else:
        _log("no llama-server given (--llama-server PATH or $STREAMGEN_LLAMA_SERVER): streamgen runs alone")
    _report(config, rows, args)
    return 0


def _report(config: dict[str, Any], rows: list[MemoryRow], args) -> None:
    llama = next((r for r in rows if r.server == LLAMA), None)
    peer = f"llama-server {config['llama_server']['version']}" if llama else "llama-server: not run"
    print(f"\n{config['requests']} requests of {config['prompt_tokens'][0]}-{max(config['prompt_tokens'])} prompt "
          f"tokens + {config['max_tokens']} output tokens, sent at once; streamgen sized {config['max_batch']} x "
          f"{config['max_context']}; {peer}\n")
    print("| server | RSS idle (MiB) | RSS after the load (MiB) | peak (MiB) | weights (MiB) | KV slots (MiB) | "
          "tok/s | after vs llama-server |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r.after_mib / llama.after_mib:.2f}x" if llama else "-"
        weights = r.breakdown.get("weights_mib", "-")
        kv = r.breakdown.get("kv_cache_mib", "-")
        print(f"| {r.server} | {r.idle_mib:.0f} | {r.after_mib:.0f} | {r.peak_mib:.0f} | {weights} | {kv} | "
              f"{r.tokens_per_s:.1f} | {ratio} |")
    failed = sum(r.failed for r in rows)
    if failed:
        print(f"\n{failed} requests failed: the figures above are not comparable", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"config": config, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")


def _log(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)
