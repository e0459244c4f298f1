"""`streamgen bench engine`: our generation loop against Optimum's, same model.onnx.

Baseline: Optimum's `ORTModelForCausalLM.generate(use_io_binding=True)`,
greedy, on the very model.onnx streamgen loads. Both generate exactly the
same number of tokens from the same prompt (end-of-sequence ignored), in
rounds that alternate which goes first, inside one process, so machine noise
hits both alike. Reported: median end-to-end tokens/s (prefill included) and
the ratio. Needs the export extra (Optimum, torch).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from streamgen.bench.common import greedy_request
from streamgen.engine.device import Device
from streamgen.engine.generate import generate
from streamgen.engine.loader import LoadedModel, load_model
from streamgen.engine.request import GenerationRequest, TokenEvent


@dataclass(frozen=True, slots=True)
class VariantResult:
    quantization: str
    prompt_tokens: int
    new_tokens: int
    streamgen_tok_s: float
    optimum_tok_s: float
    ratio: float
    same_tokens: bool
    rounds: int


def _run_ours(model: LoadedModel, request: GenerationRequest) -> tuple[float, list[int]]:
    start = time.perf_counter()
    ids = [e.token_id for e in generate(model.runner, model.tokenizer, [request]) if isinstance(e, TokenEvent)]
    return time.perf_counter() - start, ids


def _run_optimum(ref, input_ids, attention_mask, tokens: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = ref.generate(input_ids, attention_mask=attention_mask, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    return elapsed, out[0, input_ids.shape[1] :].tolist()


def bench_variant(directory: Path, quantization: str, rounds: int, tokens: int, threads: int) -> VariantResult:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = load_model(directory, Device("cpu"), threads)
    request = greedy_request(model, tokens)

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    ref = ORTModelForCausalLM.from_pretrained(
        directory, use_io_binding=True, provider="CPUExecutionProvider", session_options=options
    )
    ref.generation_config.eos_token_id = None  # exactly `tokens` new tokens, like ignore_eos
    input_ids = torch.tensor([request.prompt_ids])
    mask = torch.ones_like(input_ids)

    # Warm-up: first runs pay for allocations and thread-pool start-up.
    _, ours_ids = _run_ours(model, request)
    _, ref_ids = _run_optimum(ref, input_ids, mask, tokens)
    ours_t, ref_t = [], []
    for r in range(rounds):
        order = ("ours", "ref") if r % 2 == 0 else ("ref", "ours")
        for who in order:
            if who == "ours":
                ours_t.append(_run_ours(model, request)[0])
            else:
                ref_t.append(_run_optimum(ref, input_ids, mask, tokens)[0])
        print(f"  {quantization} round {r + 1}/{rounds}: streamgen {tokens / ours_t[-1]:6.1f} tok/s, "
              f"optimum {tokens / ref_t[-1]:6.1f} tok/s", file=sys.stderr, flush=True)
    ours_rate = tokens / statistics.median(ours_t)
    ref_rate = tokens / statistics.median(ref_t)
    return VariantResult(
        quantization, len(request.prompt_ids), tokens, round(ours_rate, 1), round(ref_rate, 1),
        round(ours_rate / ref_rate, 2), ours_ids == ref_ids, rounds,
    )


def run_engine_bench(args) -> int:
    from streamgen.models.pull import ensure_model

    variants = [v.strip() for v in args.quantize.split(",") if v.strip()]
    results = []
    for quantization in variants:
        # Optimum's ORTModelForCausalLM runs Optimum's own graph, not the GQA one.
        directory = ensure_model(args.model, quantization, args.home, graph="plain")
        results.append(bench_variant(directory, quantization, args.rounds, args.tokens, args.threads))
    print(f"\nstreamgen bench engine: {args.model}, greedy, {args.tokens} new tokens, "
          f"{args.rounds} interleaved rounds, median end-to-end tokens/s (prefill included)\n")
    print("| quantization | streamgen tok/s | Optimum generate tok/s | ratio | same tokens |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r.quantization} | {r.streamgen_tok_s} | {r.optimum_tok_s} | {r.ratio}x | {'yes' if r.same_tokens else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    return 0
