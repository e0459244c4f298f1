"""`streamgen bench NAME`: each benchmark's command line, and where it runs.

Only argparse here, so that `streamgen --help` imports no benchmark: each
benchmark's module is imported when it runs (BENCHES).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from streamgen.batch.options import ORDERS
from streamgen.config import help_of
from streamgen.models.quantize import VARIANTS
from streamgen.model_files import DEFAULT_MODEL, DEFAULT_QUANTIZATION, GRAPHS, QUANTIZATIONS

BENCHES = {
    "engine": "streamgen.bench.engine:run_engine_bench",
    "speed": "streamgen.bench.speed:run_speed_bench",
    "quality": "streamgen.bench.quality:run_quality_bench",
    "load": "streamgen.bench.load:run_load_bench",
    "batch": "streamgen.bench.batch:run_batch_bench",
    "socket": "streamgen.bench.socket:run_socket_bench",
    "cache": "streamgen.bench.cache:run_cache_bench",
    "tracing": "streamgen.bench.tracing:run_tracing_bench",
    "variants": "streamgen.bench.variants:run_variants_bench",
    "peers": "streamgen.bench.peers.command:run_peers_bench",
    "memory": "streamgen.bench.memory:run_memory_bench",
    "gpu": "streamgen.bench.gpu:run_gpu_bench",
    "structured": "streamgen.bench.structured:run_structured_bench",
    "speculation": "streamgen.bench.speculation:run_speculation_bench",
    "cluster": "streamgen.bench.cluster:run_cluster_bench",
    "step": "streamgen.bench.step:run_step_bench",
}


def add_bench_commands(sub, add_log_level) -> None:
    """The `bench` command and one subcommand per benchmark."""
    b = sub.add_parser("bench", help="benchmarks that compare against a named baseline in the same run")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH")
    bench = functools.partial(_bench_parser, add_log_level=add_log_level)
    variants = {"default": "none,int8,int4", "help": "comma-separated variants (default none,int8,int4)"}
    one = {"choices": QUANTIZATIONS, "default": "none", "help": "variant (default none)"}
    serving = {"choices": QUANTIZATIONS, "default": DEFAULT_QUANTIZATION,
               "help": f"variant (default {DEFAULT_QUANTIZATION}, the serving default)"}

    bench(bsub, "engine", "greedy tokens/s: streamgen vs Optimum ORTModelForCausalLM.generate",
          "Interleaves streamgen's engine and Optimum's generate(use_io_binding=True) on the same "
          "model.onnx (the plain graph), same prompt and token count; prints medians and ratio.",
          quantize=variants, rounds=5, tokens=True)
    bench(bsub, "speed", "plain vs GQA graphs, fp32/int8/int4/source, and llama.cpp when installed",
          "Interleaves the plain fp32 graph, the GQA graph in fp32, int8, int4 and source (when the model "
          "is on a GGUF grid), and llama.cpp on the "
          "same GGUF (when llama-cpp-python is installed); reports batch-1 decode tok/s, batch-16 "
          "aggregate tok/s and prefill time for 42 and 512 tokens.", rounds=3)
    bq = bench(bsub, "quality", "perplexity, top-1 agreement and KL of each quantization against fp32",
               "Teacher-forces the paragraphs of streamgen/bench/quality_texts.txt through each quantized "
               "variant and the fp32 one; prints perplexity, top-1 agreement with fp32 and mean KL "
               "divergence from fp32.", quantize=variants)
    bq.add_argument("--graph", choices=GRAPHS, default="auto", help=help_of("graph"))
    bq.add_argument("--sampling", action="store_true",
                    help="instead: the questions of streamgen/bench/questions.json on the default (fp32) build at "
                         "each sampling setting of the grid below, each with seeds 0..N-1; the share answered right "
                         "per setting")
    bq.add_argument("--temperatures", default="0,0.3,0.5,0.7",
                    help="with --sampling: comma-separated temperatures (default 0,0.3,0.5,0.7)")
    bq.add_argument("--top-ps", default="1.0,0.9", help="with --sampling: comma-separated top-p values (default 1.0,0.9)")
    bq.add_argument("--top-ks", default="0", help="with --sampling: comma-separated top-k values, 0 = off (default 0)")
    bq.add_argument("--seeds", type=int, default=5, help="with --sampling: seeds per setting, 0..N-1 (default 5)")
    bv = bench(bsub, "variants", "the builds and variants the default was chosen over, against fp32",
               "Measures each variant against the fp32 build, which pull makes by default: the shipped "
               "builds (fp16, int8 KV, int8, int4, source) as pull makes them, and variants built in a "
               "temporary directory through the same quantizer (int8 with blocks of 32 and 128 or fp32 "
               "layers, asymmetric int4, fp32 activations). For each: batch-1 and batch-16 tok/s "
               "(interleaved), top-1 agreement and KL against fp32, the first-token margin on 'What is the "
               "capital of France?', and the kernel shares of a batch-16 decode step. Needs the export "
               "extra.", rounds=2)
    bv.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated subset of: {', '.join(VARIANTS)} (default all; fp32 is always included)")
    bl = bench(bsub, "load", "concurrent WebSocket clients: batching vs batching off",
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
    bb = bench(bsub, "batch", "the batch runner against 16 concurrent WebSocket clients, same requests",
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
    bc = bench(bsub, "cache", "the prefix cache on vs off: multi-turn, shared system prompt, no sharing",
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
    bp = bench(bsub, "peers", "one workload against streamgen and llama.cpp's llama-server",
               "Starts `streamgen serve` and, when given one, llama.cpp's `llama-server` on the GGUF the "
               "default model comes from, both on loopback, and drives each with N concurrent clients per "
               "level (chat prompts of several lengths, greedy, end of sequence ignored, prompt caching off "
               "on both); reports throughput, time to first token and inter-token latency with the ratios "
               "streamgen / llama-server. Then 16 requests sent at once to the server against the same 16 "
               "through the engine in this process. Writes JSON and a plot.", quantize=serving, rounds=2,
       peer=True)

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
    _add_llama_server(bp)
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
    bm = bench(bsub, "memory", "resident memory under the same load: streamgen's builds and llama-server",
               "Starts `streamgen serve` once per build in --builds and, when given one, llama.cpp's "
               "`llama-server` on the GGUF the default model comes from, one after the other, each sized for "
               "16 users; reads each process's resident memory idle, then after N requests of about 301 "
               "prompt tokens and 900 output tokens sent at once, and its peak. streamgen's rows add its own "
               "breakdown (weights, KV slots) from /v1/stats. Linux only (reads /proc).", peer=True)
    bm.add_argument("--builds", default=f"{DEFAULT_QUANTIZATION},{DEFAULT_QUANTIZATION}-kvint8",
                    help="comma-separated streamgen builds, each QUANTIZATION[-fp16][-kvint8] "
                         f"(default {DEFAULT_QUANTIZATION},{DEFAULT_QUANTIZATION}-kvint8)")
    bm.add_argument("--requests", type=int, default=16, help="requests sent at once (default 16)")
    bm.add_argument("--prompt-tokens", type=int, default=301,
                    help="tokens of message text in each (distinct) prompt (default 301)")
    bm.add_argument("--max-tokens", type=int, default=900, help="output tokens of each request (default 900)")
    bm.add_argument("--max-batch", type=int, default=16, help="streamgen's KV slots (default 16)")
    bm.add_argument("--max-context", type=int, default=2048, help="streamgen's tokens per slot (default 2048)")
    _add_llama_server(bm)
    bg = bench(bsub, "gpu", "decode on a GPU: CUDA graphs on vs off, and Hugging Face transformers",
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
    bench(bsub, "socket", "tokens/s over the WebSocket vs the engine alone, same request",
          "Starts `streamgen serve` on a free loopback port and alternates the same greedy request between "
          "the in-process engine and a WebSocket client.", quantize=one, rounds=5, tokens=True, json=False)
    bench(bsub, "tracing", "tokens/s with per-token spans exported vs tracing off",
          "Interleaves the same greedy request with tracing off, per-request spans and per-token spans, "
          "the latter two exported over OTLP/HTTP to a discarding sink.",
          quantize=one, rounds=7, tokens=True, json=False)

    bs = bench(bsub, "structured", "JSON schemas held by the grammar: validity, mask and compile time, constrained "
                                   "vs free decode, and llama-server",
               "Runs a corpus of JSON schemas (streamgen/bench/structured_corpus.json) as chat requests with "
               "response_format json_schema through `streamgen serve` and, when given one, llama.cpp's "
               "`llama-server` on the same GGUF: every answer validated (greedy and sampled), compile and mask "
               "times in this process, and the decode rate constrained against free at each concurrency level "
               "(interleaved rounds, ratios printed).", quantize=serving, rounds=2, peer=True)
    bs.add_argument("--schemas", type=int, default=0, help="the first N schemas of the corpus; 0 = all (default 0)")
    bs.add_argument("--seeds", type=int, default=2, help="sampled runs at temperature 1, one seed each (default 2)")
    bs.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every request (default 256)")
    bs.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=[1, 16],
                    help="comma-separated concurrency levels for the decode rate (default 1,16)")
    bs.add_argument("--requests", type=int, default=16,
                    help="requests per level and round for the decode rate (default 16)")
    _add_llama_server(bs)

    bsp = bench(bsub, "speculation", "prompt-lookup speculation on vs off at 1, 4 and 16 clients, and llama-server's "
                                      "n-gram speculation modes on the same weights",
                "Sends grounded workloads (copy, summarise, extract, rewrite and fix code, quote an earlier turn) "
                "and an open-ended story, greedy, to `streamgen serve` with speculation on and off per request, and, "
                "when given one, to llama.cpp's `llama-server` once per --llama-spec mode on the GGUF of the same "
                "weights (F32 against --quantize none, the model's own GGUF against source); interleaved rounds; "
                "decode rate per workload, aggregate tokens/s, the share of proposals kept, and the ratios.", quantize=serving,
                rounds=2, peer=True)
    bsp.add_argument("--levels", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16],
                     help="comma-separated client counts (default 1,4,16)")
    bsp.add_argument("--llama-spec", type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
                     default=["off", "ngram-simple", "ngram-mod"],
                     help="llama-server's modes, one server each: off and any of ngram-simple, ngram-map-k, "
                          "ngram-mod, ngram-cache (default off,ngram-simple,ngram-mod)")
    _add_llama_server(bsp)

    bst = bench(bsub, "step", "where a decode step's time goes (ONNX Runtime's profile), against llama-server's "
                               "per-token time on the same weights",
                "Times streamgen's decode step at --batch rows in this process (SlotRunner.decode: the ONNX Runtime "
                "run, its IOBinding and the logits copy), then profiles the same steps with ONNX Runtime's profiler: "
                "the run's time inside the session, the kernels' time by operator, and what lies outside each. "
                "With a llama-server, its own per-token decode time on the GGUF of the same weights (F32 against "
                "--quantize none), in the same interleaved rounds.", quantize=serving, rounds=3, tokens=True,
                peer=True)
    bst.add_argument("--batch", type=int, default=1, help="rows in each decode step (default 1)")
    _add_llama_server(bst)

    bk = bench(bsub, "cluster", "replicas behind HAProxy: affinity vs round robin, and one replica vs several",
               "Starts `streamgen cluster` setups one after the other, each afresh in every round (order reversed "
               "every other round): --replicas replicas with HAProxy's affinity as shipped, the same with "
               "`balance roundrobin`, and one replica with all the cores. Each runs the same multi-turn chats "
               "(a shared system prompt, each turn sending its history back, prompt_cache_key = the chat) and "
               "reports the prefix cache's hit rate, TTFT p50/p95, output tok/s and failures, with the ratios. "
               "Then an affinity run in which one replica is killed a third of the way through: failed requests "
               "apart from the streams it held. Needs HAProxy (docs/scale-out.md).",
               quantize={"choices": QUANTIZATIONS, "default": "none", "help": "variant (default none, fp32)"},
               rounds=2)
    bk.add_argument("--replicas", type=int, default=2, help="replicas of the multi-replica setups (default 2)")
    bk.add_argument("--cores", type=int, default=0,
                    help="cores split between a setup's replicas (threads = cores // replicas); 0 = the cores this "
                         "process may use (default 0)")
    bk.add_argument("--conversations", type=int, default=32, help="chats per setup and round (default 32)")
    bk.add_argument("--turns", type=int, default=6, help="turns of each chat (default 6)")
    bk.add_argument("--concurrency", type=int, default=8, help="chats running at once (default 8)")
    bk.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every turn (default 64)")
    bk.add_argument("--system-words", type=int, default=250,
                    help="words of the system prompt every chat shares (default 250, a few hundred tokens)")
    bk.add_argument("--kill", action=argparse.BooleanOptionalAction, default=True,
                    help="also the run with one replica killed mid-way (default on)")


def _bench_parser(bsub, name: str, help: str, description: str, *, quantize: dict | None = None,
                  rounds: int | None = None, tokens: bool = False, json: bool = True,
                  peer: bool = False, add_log_level=None) -> argparse.ArgumentParser:
    """A `streamgen bench NAME` parser with the options every benchmark shares."""
    p = bsub.add_parser(name, help=help, description=description)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"{help_of('model')} (default {DEFAULT_MODEL})")
    if quantize is not None:
        p.add_argument("--quantize", **quantize)
    if rounds is not None:
        p.add_argument("--rounds", type=int, default=rounds, help=f"interleaved rounds (default {rounds})")
    if tokens:
        p.add_argument("--tokens", type=int, default=128, help="tokens generated per run (default 128)")
    if peer:  # one number for both servers, so neither gets more of the machine
        p.add_argument("--threads", type=int, default=2, help="threads of each server: ONNX Runtime intra-op threads "
                                                              "and llama-server's -t (default 2)")
    else:
        p.add_argument("--threads", type=int, default=0, help=f"{help_of('threads')} (default 0)")
    p.add_argument("--home", default=None, help=f"{help_of('home')}; $STREAMGEN_HOME when set")
    if json:
        p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this file")
    add_log_level(p)
    return p


def _add_llama_server(p: argparse.ArgumentParser) -> None:
    """The peer, llama.cpp's llama-server, for the benchmarks that run one beside streamgen."""
    p.add_argument("--llama-server", default=None,
                   help="llama-server binary (default $STREAMGEN_LLAMA_SERVER; neither: streamgen runs alone)")
    p.add_argument("--gguf", default=None,
                   help="GGUF for llama-server (default: the same weights as the streamgen build: the model's own GGUF "
                        "file (Q4_1 for the default model, Q4_K_M for the packaged ones) for source and the quantized "
                        "builds, its F32 requantization for none; a model that is not from a GGUF needs one)")
    p.add_argument("--llama-ctx", type=int, default=32768, help="llama-server's -c, shared by its slots (default 32768)")
    p.add_argument("--llama-parallel", type=int, default=16, help="llama-server's -np slots (default 16)")
