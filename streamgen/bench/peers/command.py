"""`streamgen bench peers`: start the servers, run the levels (and the ITL sweep and the burst), report."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from streamgen.bench.common import LoggedServe, ServeProcess, serve_args
from streamgen.bench.llama_server import (
    LLAMA_SERVER_ENV,
    LlamaServer,
    llama_server_version,
    peer_gguf,
    require_gguf,
    resolve_llama_server,
)
from streamgen.bench.peers.measure import (
    LevelResult,
    LevelRun,
    OfflineEngine,
    Together,
    burst,
    burst_rate,
    run_level,
    summarize,
)
from streamgen.bench.peers.report import report
from streamgen.bench.peers.workload import (
    LLAMA,
    STREAMGEN,
    Target,
    llama_target,
    prompt_words,
    sized_prompts,
    streamgen_target,
)
from streamgen.engine.config import ENGINE_DEFAULTS


def run_peers_bench(args) -> int:
    from streamgen.engine.tokenizer import TextTokenizer
    from streamgen.models.pull import ensure_model

    binary = resolve_llama_server(args.llama_server, os.environ)
    if binary is not None:
        require_gguf(args.model, args.gguf)
    directory = ensure_model(args.model, args.quantize, args.home)
    tokenizer = TextTokenizer.from_dir(directory)
    words = prompt_words()
    prompts = sized_prompts(tokenizer.encode, args.prompt_tokens, words)
    chat = args.chat = tokenizer.chat_template is not None  # a base model (no template): prompts as plain text
    if not chat:
        _log(f"{args.model} has no chat template: prompts go as plain text (/v1/completions, the WebSocket's prompt)")
    cache_on = args.prefix_cache == "on"
    common = [*serve_args(args), "--max-batch", str(args.max_batch), "--max-queued", "256",
              "--max-requests-per-connection", "1", "--rate-limit", "0", "--prefix-cache", args.prefix_cache]
    tmp = tempfile.TemporaryDirectory(prefix="streamgen-peers-")
    servers: list[Any] = []
    engine = together = None
    sweep: list[LevelResult] = []
    config: dict[str, Any] = {
        "model": args.model, "quantize": args.quantize, "levels": args.levels, "duration_s": args.duration,
        "rounds": args.rounds, "prefix_cache": args.prefix_cache, "threads": args.threads,
        "itl_target_ms": ENGINE_DEFAULTS.itl_target_ms,  # the main streamgen server runs the serving default
        "max_batch": args.max_batch, "max_tokens": args.max_tokens,
        "prompt_tokens": [len(tokenizer.encode(p)) for p in prompts], "streamgen_transport": args.streamgen_transport,
        "chat": chat,
        "llama_server": None,
    }
    try:
        streamgen = LoggedServe("streamgen", common)
        servers.append(streamgen)
        targets = [streamgen_target(streamgen, args.streamgen_transport, chat)]
        if binary is not None:
            # The same weights on both sides (equal_weights_gguf): F32 against the fp32 build, the model's own
            # GGUF against source.
            gguf, pairing = peer_gguf(binary, args, Path(tmp.name))
            llama = LlamaServer(binary, gguf, context=args.llama_ctx, parallel=args.llama_parallel,
                                threads=args.threads)
            servers.append(llama)
            targets.append(llama_target(llama, cache_on, chat))
            config["llama_server"] = {"binary": str(binary), "version": llama_server_version(binary),
                                      "gguf": gguf.name, "pairing": pairing,
                                      "command": " ".join(llama.command[1:])}
        else:
            _log(f"no llama-server given (--llama-server PATH or ${LLAMA_SERVER_ENV}): streamgen runs alone")
        if args.together > 0:
            _log("loading the engine in this process for the arrive-together comparison ...")
            engine = OfflineEngine(directory, args.threads, args.max_batch, cache_on)
        for server in servers:
            server.wait_ready()
        for target in targets:  # one short request each: first connections, and a refusal found early
            warm = asyncio.run(target.send("warm", prompts[0], min(args.max_tokens)))
            if not warm.ok:
                raise RuntimeError(f"{target.name} refused the first request: {json.dumps(warm.final)[:300]}")
        runs = _levels(targets, prompts, args)
        if args.itl_sweep:
            sweep = _sweep(common, prompts, args)
        if engine is not None:
            together = _together(engine, streamgen, servers[1] if binary is not None else None, tokenizer, words,
                                 args)
    finally:
        for server in servers:
            server.stop()
        tmp.cleanup()
    results = [summarize([r for r in runs if r.server == t.name and r.concurrency == level])
               for level in args.levels for t in targets]
    config["transports"] = {t.name: t.transport for t in targets}
    report(config, results, together, args, sweep)
    return 0


def itl_label(target_ms: float) -> str:
    return f"streamgen itl {target_ms:g} ms" if target_ms else "streamgen itl off"


def _sweep(common: Sequence[str], prompts: Sequence[str], args) -> list[LevelResult]:
    """The trade the ITL target makes: one streamgen server per --itl-sweep value, at the highest level, in
    interleaved rounds; time to first token against inter-token latency."""
    level = max(args.levels)
    servers = [LoggedServe(itl_label(ms), [*common, "--itl-target-ms", f"{ms:g}"]) for ms in args.itl_sweep]
    try:
        for server in servers:
            server.wait_ready()
        targets = [Target(s.name, streamgen_target(s, args.streamgen_transport, args.chat).send, "") for s in servers]
        for target in targets:
            asyncio.run(target.send("warm", prompts[0], min(args.max_tokens)))
        _log(f"ITL target sweep at {level} clients: {', '.join(t.name for t in targets)}")
        sweep_args = argparse.Namespace(**{**vars(args), "levels": [level]})
        runs = _levels(targets, prompts, sweep_args)
    finally:
        for server in servers:
            server.stop()
    return [summarize([r for r in runs if r.server == t.name]) for t in targets]


def _levels(targets: Sequence[Target], prompts: Sequence[str], args) -> list[LevelRun]:
    runs = []
    for round_no in range(args.rounds):
        order = list(targets) if round_no % 2 == 0 else list(reversed(targets))
        for level in args.levels:
            for target in order:
                run = asyncio.run(run_level(target, prompts, args.max_tokens, level, args.duration, round_no))
                runs.append(run)
                row = summarize([run])
                _log(f"  round {round_no + 1}/{args.rounds} {target.name:12s} {level:3d} clients: "
                     f"{row.tokens_per_s:7.1f} tok/s, ttft p50 {row.ttft_ms['p50']:8.1f} ms, "
                     f"itl p95 {row.itl_ms['p95']:7.1f} ms, {row.requests} requests, {row.failed} failed")
    return runs


def _together(engine: OfflineEngine, streamgen: ServeProcess, llama: LlamaServer | None, tokenizer, words,
              args) -> Together:
    prompts = sized_prompts(tokenizer.encode, [args.together_prompt_tokens] * args.together, words, stride=31)
    requests = engine.requests(prompts, args.together_tokens, args.chat)
    result = Together(args.together, args.together_tokens, [len(r.prompt_ids) for r in requests], [], [], [])
    transport = args.streamgen_transport
    streamgen_url = streamgen.ws_url if transport == "websocket" else streamgen.url
    _log("warming up the engine: every decode width once ...")
    engine.warm_up()
    engine.run(requests)
    asyncio.run(burst(STREAMGEN, streamgen_url, prompts, args.together_tokens, transport, False, args.chat))
    if llama is not None:
        asyncio.run(burst(LLAMA, llama.url, prompts, args.together_tokens, transport, args.prefix_cache == "on",
                          args.chat))
    for round_no in range(args.rounds):
        contenders = ["engine", STREAMGEN] + ([LLAMA] if llama is not None else [])
        for who in contenders if round_no % 2 == 0 else contenders[::-1]:
            if who == "engine":
                result.engine_tok_s.append(round(engine.run(requests), 1))
                continue
            url = streamgen_url if who == STREAMGEN else llama.url  # type: ignore[union-attr]
            sent = asyncio.run(burst(who, url, prompts, args.together_tokens, transport, args.prefix_cache == "on",
                                     args.chat))
            result.failed += sum(not r.ok for r in sent)
            (result.server_tok_s if who == STREAMGEN else result.llama_tok_s).append(round(burst_rate(sent), 1))
        _log(f"  together, round {round_no + 1}/{args.rounds}: engine {result.engine_tok_s[-1]:.1f}, streamgen "
             f"{result.server_tok_s[-1]:.1f}" + (f", llama-server {result.llama_tok_s[-1]:.1f}" if llama else "")
             + " tok/s")
    return result


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
