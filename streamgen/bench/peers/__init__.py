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

The package, by job: workload.py (prompts, requests, the servers as targets), measure.py (levels, ratios,
the burst), report.py (table, JSON, plot), command.py (the run); llama-server itself is
streamgen/bench/llama_server.py, which the memory and gpu benchmarks use too.
"""
