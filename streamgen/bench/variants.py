"""`streamgen bench variants`: the quantization choices behind the builds, measured against int8.

`pull` builds int8, int4 and source one way each. This benchmark also builds,
into a temporary directory and through the same `quantize_model`, the
variants those were chosen over (other block sizes, asymmetric int4, fp32
activations), and measures them all in one process against the shipped int8:

- batch-1 and batch-16 decode tok/s, interleaved rounds (as `bench speed`);
- top-1 agreement and mean KL against fp32 (as `bench quality`);
- the France margin: for "What is the capital of France?", the first-token
  logit of fp32's choice ("The") minus the best other token's; below zero
  the variant's greedy answer starts with something else (in French);
- the share of MatMulNBits and of GroupQueryAttention in a batch-16 decode
  step, from ONNX Runtime's profiler;
- batch invariance: whether a batch-16 decode step gives every row exactly
  the logits it gets when decoded alone (continuous batching needs that).

Needs the export extra (onnx and ONNX Runtime's quantizer) for the builds.
"""

from __future__ import annotations

import collections
import re
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from streamgen.model_files import Build
from streamgen.models.quantize import VARIANTS

BASELINE = "fp32"  # the default build (model_files.DEFAULT_QUANTIZATION); docs/benchmarks.md says why
FRANCE = "What is the capital of France?"
PROFILED_STEPS = 10


@dataclass(frozen=True, slots=True)
class VariantRow:
    name: str
    batch1_tok_s: float
    batch16_tok_s: float
    top1_agreement: float
    mean_kl: float
    france_margin: float
    matmul_share: float  # of one batch-16 decode step's kernel time
    attention_share: float
    batch_invariant: bool
    answers_kept: int  # of bench/questions.json, as `bench quality` counts them
    answers_total: int


def _build(name: str, fp32_dir: Path, into: Path) -> Path:
    from streamgen.models.quantize import quantize_model

    method, options = VARIANTS[name]
    out = into / re.sub(r"\W+", "-", name)
    out.mkdir()
    for f in fp32_dir.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy2(f, out / f.name)
    quantize_model(fp32_dir / "model.onnx", out / "model.onnx", method, **options)
    return out


def _first_token_logits(directory: Path, ids: list[int]):
    from streamgen.engine.device import Device
    from streamgen.engine.slots import SlotConfig, SlotRunner

    runner = SlotRunner(directory, Device("cpu"), SlotConfig(max_batch=1, max_context=128))
    return runner.prefill(runner.allocate(), ids)


def _batch_invariant(directory: Path, prompts: list[list[int]]) -> bool:
    from streamgen.engine.device import Device
    from streamgen.engine.invariance import batch_invariant
    from streamgen.engine.slots import SlotConfig, SlotRunner

    runner = SlotRunner(directory, Device("cpu"), SlotConfig(max_batch=len(prompts), max_context=128))
    return batch_invariant(runner, [p[: 10 + 2 * i] for i, p in enumerate(prompts)])  # different lengths


def _kernel_shares(directory: Path, prompts: list[list[int]], prefix: Path) -> tuple[float, float]:
    from streamgen.bench.speed import BATCH
    from streamgen.engine.device import Device
    from streamgen.engine.slots import SlotConfig, SlotRunner

    runner = SlotRunner(directory, Device("cpu"), SlotConfig(max_batch=BATCH, max_context=640, forward_tokens=512),
                        profile_prefix=str(prefix))
    slots = [runner.allocate() for _ in prompts]
    tokens = [int(runner.prefill(s, p).argmax()) for s, p in zip(slots, prompts)]
    for _ in range(PROFILED_STEPS):
        tokens = runner.decode(slots, tokens).argmax(axis=1).tolist()
    events = json.loads(Path(runner.session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    for e in events:
        # Decode steps only: prefill runs are a different shape of work.
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["args"].get("output_type_shape"):
            shape = e["args"]["output_type_shape"][0]
            if next(iter(shape.values()))[:2] == [BATCH, 1]:
                per_op[e["args"]["op_name"]] += e["dur"]
    total = sum(per_op.values()) or 1
    return per_op["MatMulNBits"] / total, per_op["GroupQueryAttention"] / total


def run_variants_bench(args) -> int:
    import numpy as np

    from streamgen.bench.quality import run_quality
    from streamgen.bench.speed import SlotContender, bench_prompts
    from streamgen.models.pull import ensure_model
    from streamgen.engine.tokenizer import ChatMessage, TextTokenizer

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"streamgen: error: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    if BASELINE not in names:
        names.insert(0, BASELINE)
    fp32_dir = ensure_model(args.model, "none", args.home, graph="gqa")
    tmp = tempfile.TemporaryDirectory()
    work = Path(tmp.name)
    dirs: dict[str, Path] = {}
    for name in names:
        method, options = VARIANTS[name]
        print(f"  building {name}", file=sys.stderr, flush=True)
        dirs[name] = (ensure_model(args.model, Build.from_label(method), args.home, graph="gqa") if not options
                      else _build(name, fp32_dir, work))

    tokenizer = TextTokenizer.from_dir(fp32_dir)
    short, _, batch = bench_prompts(tokenizer)
    france = tokenizer.encode(tokenizer.render_chat([ChatMessage("user", FRANCE)]))
    reference = _first_token_logits(fp32_dir, france)
    first = int(reference.argmax())

    quality = {r.quantization: r for r in run_quality({"none": fp32_dir, **dirs}, args.threads)}
    contenders = [SlotContender(name, dirs[name], args.threads) for name in names]
    speed: dict[str, dict[str, list[float]]] = {n: {"b1": [], "b16": []} for n in names}
    for r in range(args.rounds):
        for c in contenders if r % 2 == 0 else contenders[::-1]:
            speed[c.name]["b1"].append(c.batch1(short))
            speed[c.name]["b16"].append(c.batch16(batch))
            print(f"  round {r + 1}/{args.rounds} {c.name}: batch-1 {speed[c.name]['b1'][-1]:.1f}, "
                  f"batch-16 {speed[c.name]['b16'][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    del contenders

    rows = []
    for name in names:
        logits = _first_token_logits(dirs[name], france)
        mm, attn = _kernel_shares(dirs[name], batch, work / f"profile-{len(rows)}")
        rows.append(VariantRow(
            name, round(statistics.median(speed[name]["b1"]), 1), round(statistics.median(speed[name]["b16"]), 1),
            quality[name].top1_agreement, quality[name].mean_kl,
            round(float(logits[first] - np.delete(logits, first).max()), 3), round(mm, 3), round(attn, 3),
            _batch_invariant(dirs[name], batch), quality[name].answers_kept, quality[name].answers_total,
        ))
    tmp.cleanup()

    base = next(r for r in rows if r.name == BASELINE)
    margin = f"{tokenizer.decode([first])!r} - best other"
    print(f"\nstreamgen bench variants: {args.model}, GQA graph, {args.rounds} interleaved rounds (medians), "
          f"baseline {BASELINE} as `pull` builds it; fp32 France margin {margin} = "
          f"{float(reference[first] - np.delete(reference, first).max()):.3f}\n")
    print(f"| variant | batch-1 tok/s | vs {BASELINE} | batch-16 tok/s | vs {BASELINE} | top-1 vs fp32 | mean KL | "
          f"answers kept | France margin ({margin}) | batch-16 step: MatMulNBits / GQA | batch-invariant |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.name} | {r.batch1_tok_s} | {r.batch1_tok_s / base.batch1_tok_s:.2f}x | {r.batch16_tok_s} | "
              f"{r.batch16_tok_s / base.batch16_tok_s:.2f}x | {r.top1_agreement:.1%} | {r.mean_kl} | "
              f"{r.answers_kept}/{r.answers_total} | {r.france_margin:+.3f} | "
              f"{r.matmul_share:.0%} / {r.attention_share:.0%} | {'yes' if r.batch_invariant else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0
