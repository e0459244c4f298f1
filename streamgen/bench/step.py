"""`streamgen bench step`: where a decode step's time goes, against llama-server's on the same weights.

streamgen's decode step at --batch rows, in this process, measured two ways:

- without the profiler: the wall time of SlotRunner.decode (ONNX Runtime's
  run through its IOBinding, and the logits copied out), per step;
- with ONNX Runtime's profiler, on a second session of the same model: each
  decode run's time inside the session (its `model_run` event) and the
  kernels' time by operator. Inside the run but outside the kernels is the
  session's own work (dispatching some 370 nodes, allocations); outside the
  run is streamgen's (binding the step's inputs, the logits copy, Python).
  The profiler adds its own cost, so these are shares, and the unprofiled
  wall time is the step's time.

With a llama-server (--llama-server or $STREAMGEN_LLAMA_SERVER) on the GGUF
of the same weights (F32 against --quantize none): one greedy request of
--tokens tokens a round, timed by the server itself
(timings.predicted_per_token_ms), in the same interleaved rounds.
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from streamgen.bench.llama_server import LlamaServer, llama_server_version, peer_gguf, resolve_llama_server

PROMPT = "The lighthouse keeper climbed the narrow stairs every evening at dusk and lit the great lamp."


@dataclass(frozen=True, slots=True)
class StepProfile:
    """One profiled run of decode steps, per step."""

    wall_ms: float  # SlotRunner.decode, profiler on
    run_ms: float  # ONNX Runtime's model_run
    kernel_ms: float  # the nodes' kernels
    nodes: int  # kernel launches a step
    ops: dict[str, float]  # operator -> share of the kernel time


def run_step_bench(args) -> int:
    from streamgen.engine.tokenizer import TextTokenizer
    from streamgen.models.pull import ensure_model

    binary = resolve_llama_server(args.llama_server, os.environ)
    directory = ensure_model(args.model, args.quantize, args.home)
    prompt = TextTokenizer.from_dir(directory).encode(PROMPT)
    report: dict[str, Any] = {"model": args.model, "quantize": args.quantize, "batch": args.batch,
                              "tokens": args.tokens, "rounds": args.rounds, "threads": args.threads,
                              "llama_server": None}
    tmp = tempfile.TemporaryDirectory(prefix="streamgen-step-")
    llama = None
    try:
        if binary is not None:
            gguf, pairing = peer_gguf(binary, args, Path(tmp.name))
            llama = LlamaServer(binary, gguf, context=args.llama_ctx, parallel=args.llama_parallel,
                                threads=args.threads)
            report["llama_server"] = {"version": llama_server_version(binary), "gguf": gguf.name,
                                      "pairing": pairing}
            llama.wait_ready()
        plain = _runner(directory, args, len(prompt))
        walls: list[float] = []
        llama_ms: list[float] = []
        _decode_steps(plain, prompt, args)  # warm-up: every shape once
        for round_no in range(args.rounds):
            order = ("streamgen", "llama-server") if round_no % 2 == 0 else ("llama-server", "streamgen")
            for who in order:
                if who == "streamgen":
                    walls.append(statistics.median(_decode_steps(plain, prompt, args)))
                elif llama is not None:
                    llama_ms.append(_llama_per_token_ms(llama.url, args.tokens))
            _log(f"  round {round_no + 1}/{args.rounds}: streamgen {walls[-1]:.2f} ms a step"
                 + (f", llama-server {llama_ms[-1]:.2f} ms a token" if llama_ms else ""))
        report["streamgen_step_ms"] = round(statistics.median(walls), 3)
        report["llama_server_token_ms"] = round(statistics.median(llama_ms), 3) if llama_ms else None
        report["profile"] = asdict(_profile(directory, prompt, args, Path(tmp.name)))
    finally:
        if llama is not None:
            llama.stop()
        tmp.cleanup()
    _print(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _runner(directory: Path, args, prompt_tokens: int, profile_prefix: str | None = None):
    from streamgen.engine.device import Device
    from streamgen.engine.slots import SlotConfig, SlotRunner

    config = SlotConfig(max_batch=args.batch, max_context=prompt_tokens + args.tokens + 8)
    return SlotRunner(directory, Device("cpu"), config, args.threads, profile_prefix=profile_prefix)


def _decode_steps(runner, prompt: list[int], args) -> list[float]:
    """Prefill --batch slots with the prompt, then --tokens greedy decode steps: each step's wall ms."""
    slots = [runner.allocate() for _ in range(args.batch)]
    tokens = [int(runner.prefill(s, prompt).argmax()) for s in slots]
    ms = []
    for _ in range(args.tokens):
        start = time.perf_counter()
        logits = runner.decode(slots, tokens)
        ms.append((time.perf_counter() - start) * 1000)
        tokens = logits.argmax(axis=1).tolist()
    for s in slots:
        runner.free(s)
    return ms


def _profile(directory: Path, prompt: list[int], args, into: Path) -> StepProfile:
    """The same steps on a profiled session; the decode runs only (the first --batch runs are prefills)."""
    runner = _runner(directory, args, len(prompt), str(into / "profile"))
    walls = _decode_steps(runner, prompt, args)
    events = json.loads(Path(runner.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][args.batch:]
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run: list[list[dict[str, Any]]] = [[k for k in kernels if r["ts"] <= k["ts"] <= r["ts"] + r["dur"]]
                                           for r in runs]
    per_op: collections.Counter[str] = collections.Counter()
    for k in (k for run in per_run for k in run):
        per_op[k["args"]["op_name"]] += k["dur"]
    total = sum(per_op.values()) or 1
    # Medians of per-step figures: the first step of a shape is slow (allocations), and a step's kernels fit in
    # its run, and its run in its wall time, so the medians keep that order too.
    return StepProfile(
        wall_ms=round(statistics.median(walls), 3),
        run_ms=round(statistics.median(r["dur"] for r in runs) / 1000, 3),
        kernel_ms=round(statistics.median(sum(k["dur"] for k in run) for run in per_run) / 1000, 3),
        nodes=int(statistics.median(len(run) for run in per_run)),
        ops={op: round(us / total, 4) for op, us in per_op.most_common()})


def _llama_per_token_ms(url: str, tokens: int) -> float:
    """One greedy request of `tokens` tokens, as llama-server times its own decoding."""
    body = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
    request = urllib.request.Request(url + "/completion", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as r:
        return float(json.loads(r.read())["timings"]["predicted_per_token_ms"])


def _print(report: dict[str, Any]) -> None:
    p = report["profile"]
    llama = report["llama_server"]
    print(f"\nstreamgen bench step: {report['model']} ({report['quantize']}), {report['batch']} row(s), "
          f"{report['tokens']} decode steps a round, {report['rounds']} interleaved rounds, {report['threads']} "
          "threads (0: one per core)" + (f"; llama-server {llama['version']} on {llama['gguf']} ({llama['pairing']})"
                                        if llama else ""))
    print("\n| | ms a step |\n|---|---|")
    print(f"| streamgen decode step (wall, median of the rounds' medians) | {report['streamgen_step_ms']} |")
    if report["llama_server_token_ms"] is not None:
        ratio = report["llama_server_token_ms"] / report["streamgen_step_ms"]
        print(f"| llama-server, its own predicted_per_token_ms | {report['llama_server_token_ms']} |")
        print(f"| streamgen speed / llama-server's | {ratio:.2f}x |")
    run, wall, kernels = p["run_ms"], p["wall_ms"], p["kernel_ms"]
    print(f"\nprofiled (the profiler adds its own cost): step {wall} ms, of which inside ONNX Runtime's run {run} ms "
          f"({run / wall:.0%}), in its {p['nodes']} kernels {kernels} ms ({kernels / wall:.0%}); outside the run "
          f"(binding, the logits copy, Python) {wall - run:.3f} ms ({(wall - run) / wall:.0%})")
    print("\n| operator | share of the kernel time |\n|---|---|")
    for op, share in list(p["ops"].items())[:8]:
        print(f"| {op} | {share:.1%} |")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
