"""The peers benchmark's table, JSON and plot, with the targets it is judged against."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from streamgen.bench.llama_server import LLAMA_SERVER_ENV
from streamgen.bench.peers.measure import TOGETHER_TARGET, LevelResult, Together, ratios
from streamgen.bench.peers.workload import LLAMA, STREAMGEN
from streamgen.engine.config import ENGINE_DEFAULTS


def report(config: dict[str, Any], results: list[LevelResult], together: Together | None, args,
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
