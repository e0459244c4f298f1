"""`streamgen bench cluster`: replicas behind HAProxy, affinity against round robin, on real processes.

The workload: --conversations chats of --turns turns each (32 x 6 by default),
--concurrency of them at a time (turns in order within a chat). Every chat
starts with the same long system prompt (a few hundred tokens) and grows: each
turn sends the whole history back (the questions and the previous answers) and
a new question, greedy, --max-tokens each, streamed over /v1/chat/completions,
with `prompt_cache_key` = the chat's id (what HAProxy hashes).

Setups, each a `streamgen cluster` (streamgen/cluster.py) started afresh in
every round, rounds interleaved with the order reversed every other round:

- affinity: --replicas replicas, the cores split between them, HAProxy as
  shipped (consistent hash on the key, bounded load);
- round robin: the same with the balance line replaced by `balance roundrobin`
  (everything else as shipped);
- one replica: a single replica with all the cores, behind the same HAProxy.

For each: the prefix cache's hit rate (cached prompt tokens over prompt tokens;
the share of turns after the first with any cached token; the share that found
their own history cached, i.e. at least the previous turn's whole prompt, where
another replica could only give the prefix every chat shares), time to first
token p50 and p95, output tokens per second, failures. Then one more affinity
run in which one replica is killed (SIGKILL) a third of the way through: the
failed requests are counted apart from the streams the killed replica held and
from those sent to it while the kernel tore it down (its listening socket takes
connections until its memory is freed), and every failed turn is sent again
once, as a client would.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from streamgen.bench.quality import load_texts
from streamgen.cluster import Cluster, replica_threads

QUESTIONS = [
    "Give me a short overview of {topic}.",
    "What is the most surprising fact about it?",
    "How would you explain that to a child?",
    "What do people often get wrong about it?",
    "Name one open question about it.",
    "Summarise our conversation in two sentences.",
]
TOPICS = ["lighthouses", "volcanoes", "honey bees", "glaciers", "the printing press", "coral reefs", "comets",
          "tea", "bridges", "owls", "the Silk Road", "rainbows", "chess", "tides", "maple syrup", "deserts",
          "octopuses", "paper", "thunderstorms", "the telescope", "salt", "wolves", "clocks", "mushrooms",
          "sailing ships", "caves", "the violin", "penguins", "bread", "earthquakes", "the compass", "rivers"]
SETUPS = ("affinity", "round robin", "one replica")


@dataclass(frozen=True, slots=True)
class Turn:
    """One request as the client saw it."""

    conversation: str
    turn: int
    ok: bool
    sent: float  # perf_counter() when it left
    ended: float
    ttft_s: float  # nan when no token arrived
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    replica: str | None  # X-Streamgen-Replica, when headers arrived
    error: str | None = None
    retry: bool = False  # a failed turn sent again


@dataclass(slots=True)
class RunFigures:
    """One setup in one round."""

    setup: str
    round: int
    replicas: int
    threads: int
    wall_s: float
    requests: int
    failed: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    token_hit_rate: float  # cached / prompt tokens
    later_turns_cached: float  # share of turns after the first with cached_tokens > 0
    later_turns_history: float  # share of turns after the first that found their previous turn's prompt cached
    ttft_p50_ms: float
    ttft_p95_ms: float
    output_tok_s: float
    by_replica: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class KillFigures:
    """The affinity setup with one replica killed mid-run."""

    victim: str
    killed_after_requests: int
    requests: int  # first tries
    failed: int
    failed_held: int  # streams the killed replica held when it was killed (sent before, not finished)
    failed_dying: int  # sent while it was being torn down: its socket still took connections, nothing answered
    failed_other: int  # every other failure: the target is 0
    teardown_ms: float  # from SIGKILL to the process gone (its memory freed, then its sockets closed)
    retried_ok: int  # failed turns sent again that succeeded
    later_turns_history_after_kill: float
    errors: list[str] = field(default_factory=list)


def system_prompt(words: int) -> str:
    text = " ".join(" ".join(load_texts()).split()[:words])
    return "You are a helpful assistant. Answer briefly. Background reading, for reference only: " + text


def conversation_ids(count: int, round_no: int, tag: str) -> list[str]:
    return [f"{tag}-r{round_no}-c{c}" for c in range(count)]


async def _turn(client, url: str, key: str, turn: int, messages: list[dict], max_tokens: int,
                retry: bool = False) -> tuple[Turn, str]:
    """One streamed chat turn, timed as bench/clients.py's sse_request times it (sent: before the request; a
    token's arrival: each content chunk), with the replica that served it."""
    import httpx

    body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "prompt_cache_key": key, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    pieces: list[str] = []
    replica = None
    error = None
    done = False
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            replica = r.headers.get("x-streamgen-replica")
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = str(chunk["error"])[:200]
                        break
                    text = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", ()))
                    if text:
                        first = first or time.perf_counter()
                        pieces.append(text)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                if not done and error is None:
                    error = "the stream ended without [DONE]"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    ended = time.perf_counter()
    ok = done and error is None and bool(usage)
    details = usage.get("prompt_tokens_details") or {}
    return Turn(key, turn, ok, sent, ended, (first - sent) if first else float("nan"),
                usage.get("prompt_tokens", 0), details.get("cached_tokens", 0), usage.get("completion_tokens", 0),
                replica, error, retry), "".join(pieces)


async def run_workload(url: str, keys: list[str], turns: int, concurrency: int, max_tokens: int, system: str,
                       on_turn=None) -> tuple[list[Turn], float]:
    """Every conversation, `concurrency` at a time, turns in order. A failed turn is sent once more (as a
    client would); both tries are returned. on_turn(turns_done) is called after each first try."""
    import httpx

    results: list[Turn] = []
    gate = asyncio.Semaphore(concurrency)

    async def conversation(c: int, key: str) -> None:
        async with gate, httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10)) as client:
            topic = TOPICS[c % len(TOPICS)]
            messages = [{"role": "system", "content": system}]
            for t in range(turns):
                question = QUESTIONS[t % len(QUESTIONS)].format(topic=topic)
                if t == 0:
                    question = f"(chat {key}) {question}"
                messages.append({"role": "user", "content": question})
                result, text = await _turn(client, url, key, t, messages, max_tokens)
                results.append(result)
                if on_turn is not None:
                    on_turn(sum(1 for r in results if not r.retry))
                if not result.ok:
                    result, text = await _turn(client, url, key, t, messages, max_tokens, retry=True)
                    results.append(result)
                    if not result.ok:
                        return  # the conversation is lost; the failures are counted
                messages.append({"role": "assistant", "content": text})

    start = time.perf_counter()
    await asyncio.gather(*(conversation(c, key) for c, key in enumerate(keys)))
    return results, time.perf_counter() - start


def history_hits(turns: list[Turn]) -> list[tuple[Turn, bool]]:
    """Each answered turn after the first, and whether its conversation's history was cached: at least its
    previous turn's whole prompt (on another replica only the prefix every chat shares can be)."""
    prompts = {(t.conversation, t.turn): t.prompt_tokens for t in turns if t.ok}
    return [(t, t.cached_tokens >= prompts[(t.conversation, t.turn - 1)]) for t in turns
            if t.ok and t.turn > 0 and (t.conversation, t.turn - 1) in prompts]


def summarize(setup: str, round_no: int, replicas: int, threads: int, turns: list[Turn], wall_s: float,
              by_replica: dict[str, int] | None = None) -> RunFigures:
    first_tries = [t for t in turns if not t.retry]
    ok = [t for t in turns if t.ok]
    later = [t for t in ok if t.turn > 0]
    prompt = sum(t.prompt_tokens for t in ok)
    cached = sum(t.cached_tokens for t in ok)
    ttfts = [t.ttft_s * 1000 for t in ok if t.ttft_s == t.ttft_s]
    completion = sum(t.completion_tokens for t in ok)

    def share(values: list[bool]) -> float:
        return round(sum(values) / len(values), 4) if values else float("nan")

    return RunFigures(
        setup, round_no, replicas, threads, round(wall_s, 2), len(first_tries), sum(not t.ok for t in first_tries),
        prompt, cached, completion, round(cached / prompt, 4) if prompt else float("nan"),
        share([t.cached_tokens > 0 for t in later]), share([hit for _, hit in history_hits(turns)]),
        round(float(np.percentile(ttfts, 50)), 1) if ttfts else float("nan"),
        round(float(np.percentile(ttfts, 95)), 1) if ttfts else float("nan"),
        round(completion / wall_s, 2) if wall_s else float("nan"), dict(by_replica or {}))


def _served(cluster: Cluster) -> dict[str, int]:
    """Requests each replica has served so far, from HAProxy's stats (stot)."""
    import csv
    import io
    import urllib.request

    with urllib.request.urlopen(cluster.local_url + "/haproxy/stats;csv", timeout=5) as r:  # noqa: S310
        rows = csv.DictReader(io.StringIO(r.read().decode().lstrip("# ")))
        return {row["svname"]: int(row["stot"] or 0) for row in rows
                if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")}


def _serve_flags(args) -> list[str]:
    flags = ["--model", args.model, "--quantize", args.quantize, "--device", "cpu", "--log-level", "warning",
             "--rate-limit", "0", "--max-queued", "256", "--shutdown-grace", "5"]
    return flags + (["--home", args.home] if args.home else [])


def _cluster(args, setup: str) -> Cluster:
    replicas = 1 if setup == "one replica" else args.replicas
    return Cluster(replicas, _serve_flags(args), port=0, threads=replica_threads(replicas, args.cores or None),
                   balance="roundrobin" if setup == "round robin" else None, shutdown_grace=5)


def run_setup(args, setup: str, round_no: int, system: str) -> RunFigures:
    with _cluster(args, setup) as cluster:
        keys = conversation_ids(args.conversations, round_no, setup.replace(" ", "-"))
        turns, wall = asyncio.run(run_workload(cluster.local_url, keys, args.turns, args.concurrency,
                                               args.max_tokens, system))
        served = _served(cluster)
        return summarize(setup, round_no, cluster.count, cluster.threads, turns, wall, served)


def run_kill(args, system: str) -> KillFigures:
    """The affinity setup; one replica SIGKILLed once a third of the first tries are done."""
    with _cluster(args, "affinity") as cluster:
        victim = cluster.replicas[0].name
        total = args.conversations * args.turns
        threshold = max(1, total // 3)
        killed: dict[str, float] = {}

        def on_turn(done: int) -> None:
            if done >= threshold and not killed:
                killed["at"] = time.perf_counter()
                killed["after"] = done
                replica = cluster.kill_replica(victim)
                threading.Thread(target=gone, args=(replica,), daemon=True).start()

        def gone(replica) -> None:
            replica.proc.wait()
            killed["gone"] = time.perf_counter()

        keys = conversation_ids(args.conversations, 0, "kill")
        turns, _ = asyncio.run(run_workload(cluster.local_url, keys, args.turns, args.concurrency, args.max_tokens,
                                            system, on_turn))
    at = killed.get("at", float("inf"))
    gone_at = killed.get("gone", at)
    first_tries = [t for t in turns if not t.retry]
    failed = [t for t in first_tries if not t.ok]
    # Held: sent before the kill, and either served by the victim or cut before any headers came back (a 502
    # from HAProxy carries no replica header). Dying: the same, sent after SIGKILL but before the process was
    # gone: the kernel frees a process's memory before it closes its sockets, and meanwhile its listening
    # socket still completes connections, which HAProxy cannot retry (one was made; nothing answers on it).
    lost = [t for t in failed if t.replica in (victim, None)]
    held = [t for t in lost if t.sent < at]
    dying = [t for t in lost if at <= t.sent < gone_at]
    after = [hit for t, hit in history_hits(turns) if t.sent > at]
    return KillFigures(
        victim, killed.get("after", 0), len(first_tries), len(failed), len(held), len(dying),
        len(failed) - len(held) - len(dying), round((gone_at - at) * 1000, 1) if killed else float("nan"),
        sum(t.ok for t in turns if t.retry),
        round(sum(after) / len(after), 4) if after else float("nan"),
        sorted({t.error or "" for t in failed})[:5])


def run_cluster_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    ensure_model(args.model, args.quantize, args.home)
    system = system_prompt(args.system_words)
    runs: list[RunFigures] = []
    for round_no in range(args.rounds):
        order = list(SETUPS) if round_no % 2 == 0 else list(reversed(SETUPS))
        for setup in order:
            row = run_setup(args, setup, round_no, system)
            runs.append(row)
            print(f"  round {round_no + 1}/{args.rounds} {setup:11s}: hit rate {row.token_hit_rate * 100:5.1f} % "
                  f"(history cached on {row.later_turns_history * 100:5.1f} % of later turns), TTFT p50 "
                  f"{row.ttft_p50_ms:7.1f} ms p95 {row.ttft_p95_ms:7.1f} ms, {row.output_tok_s:6.1f} tok/s, "
                  f"{row.failed} failed", file=sys.stderr, flush=True)
    kill = run_kill(args, system) if args.kill else None
    report = build_report(args, runs, kill)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]
    return round(statistics.median(values), 4) if values else float("nan")


def build_report(args, runs: list[RunFigures], kill: KillFigures | None) -> dict[str, Any]:
    """Medians over the rounds per setup, the ratios the targets are stated in, and every run."""
    keys = ("token_hit_rate", "later_turns_cached", "later_turns_history", "ttft_p50_ms", "ttft_p95_ms",
            "output_tok_s")
    setups = {}
    for setup in SETUPS:
        rows = [r for r in runs if r.setup == setup]
        if not rows:
            continue
        setups[setup] = {"replicas": rows[0].replicas, "threads_per_replica": rows[0].threads,
                         **{k: _median([getattr(r, k) for r in rows]) for k in keys},
                         "requests": sum(r.requests for r in rows), "failed": sum(r.failed for r in rows)}

    def ratio(a: str, b: str, key: str) -> float:
        x, y = setups.get(a, {}).get(key), setups.get(b, {}).get(key)
        return round(x / y, 3) if x and y and x == x and y == y else float("nan")

    ratios = {
        "affinity / round robin": {k: ratio("affinity", "round robin", k) for k in keys},
        "affinity / one replica": {k: ratio("affinity", "one replica", k) for k in keys},
    }
    aff, rr = setups.get("affinity", {}), setups.get("round robin", {})
    targets = {
        "affinity hit rate >= 90 %": bool(aff and aff["token_hit_rate"] >= 0.9),
        "affinity history cached on >= 90 % of later turns": bool(aff and aff["later_turns_history"] >= 0.9),
        "round robin history cached on about 1/N of later turns": (
            round(rr["later_turns_history"], 3) if rr else None, round(1 / args.replicas, 3)),
        "affinity TTFT p50 <= 0.5 x round robin": bool(ratios["affinity / round robin"]["ttft_p50_ms"] <= 0.5),
        "no failed request apart from those the killed replica held or was sent while dying": (
            kill.failed_other == 0) if kill else None,
    }
    workload = {"conversations": args.conversations, "turns": args.turns, "concurrency": args.concurrency,
                "max_tokens": args.max_tokens, "system_words": args.system_words, "replicas": args.replicas,
                "rounds": args.rounds, "model": args.model, "quantize": args.quantize,
                "cores": args.cores or replica_threads(1)}
    return {"workload": workload, "setups": setups, "ratios": ratios, "targets": targets,
            "kill": asdict(kill) if kill else None, "runs": [asdict(r) for r in runs]}


def _pct(value: float) -> str:
    return "n/a" if value != value else f"{value * 100:.1f} %"


def print_report(report: dict[str, Any]) -> None:
    w = report["workload"]
    print(f"\nstreamgen bench cluster: {w['model']} ({w['quantize']}), {w['conversations']} conversations x "
          f"{w['turns']} turns, {w['concurrency']} at a time, max_tokens {w['max_tokens']}, a shared system prompt "
          f"of {w['system_words']} words; {w['cores']} cores; medians of {w['rounds']} interleaved rounds\n")
    print("| setup | replicas x threads | prompt tokens cached | later turns with a cached prefix | later turns "
          "with their history cached | TTFT p50 (ms) | TTFT p95 (ms) | output tok/s | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in report["setups"].items():
        print(f"| {name} | {s['replicas']} x {s['threads_per_replica']} | {_pct(s['token_hit_rate'])} | "
              f"{_pct(s['later_turns_cached'])} | {_pct(s['later_turns_history'])} | {s['ttft_p50_ms']:.0f} | "
              f"{s['ttft_p95_ms']:.0f} | {s['output_tok_s']:.1f} | {s['failed']}/{s['requests']} |")
    for name, ratios in report["ratios"].items():
        print(f"\n{name}: hit rate x{ratios['token_hit_rate']}, TTFT p50 x{ratios['ttft_p50_ms']}, TTFT p95 "
              f"x{ratios['ttft_p95_ms']}, output tok/s x{ratios['output_tok_s']}")
    if (kill := report["kill"]) is not None:
        print(f"\nOne replica ({kill['victim']}) killed after {kill['killed_after_requests']} of "
              f"{kill['requests']} requests: {kill['failed']} failed: {kill['failed_held']} streams it held, "
              f"{kill['failed_dying']} sent to it in the {kill['teardown_ms']:.0f} ms the kernel took to tear it "
              f"down, {kill['failed_other']} others; {kill['retried_ok']} failed turns answered when sent again; "
              f"history cached on {_pct(kill['later_turns_history_after_kill'])} of later turns after the kill")
    print("\nTargets:")
    for name, value in report["targets"].items():
        print(f"- {name}: {value}")
