"""`streamgen bench tracing`: what per-token spans cost, against tracing off.

Three configurations of the same greedy request, interleaved in one process:
- off: no exporter configured (the default): trace ids only, no span recorded;
- request: one span per phase per request, exported over OTLP/HTTP;
- token: forward/sample/detokenize spans for every token, exported over OTLP/HTTP.
Spans go to a separate process that accepts OTLP/HTTP and discards it, so the
export cost (serialization, HTTP, the batch processor's thread) is real.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import textwrap
import time

from streamgen.bench.common import free_port, load_for_bench
from streamgen.engine.generate import generate
from streamgen.engine.request import TokenEvent
from streamgen.telemetry.setup import Telemetry

_SINK = textwrap.dedent("""
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    class H(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
        def log_message(self, *a): pass
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def run_tracing_bench(args) -> int:
    model, request = load_for_bench(args)
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", _SINK, str(port)])
    # The OTLP exporter reads its endpoint from the process environment.
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{port}"
    exporting = {"OTEL_EXPORTER_OTLP_ENDPOINT": os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"],
                 "OTEL_METRICS_EXPORTER": "none"}
    configs = {
        "off": Telemetry.from_env(env={}),
        "request": Telemetry.from_env(detail="request", env=exporting),
        "token": Telemetry.from_env(detail="token", env=exporting),
    }
    spans_per_run: dict[str, int] = {}

    def run(name: str) -> float:
        tel = configs[name]
        observer = tel.start_request("bench", "chat", None)
        start = time.perf_counter()
        n = sum(isinstance(e, TokenEvent) for e in generate(model.runner, model.tokenizer, [request], observers=[observer]))
        elapsed = time.perf_counter() - start
        spans_per_run[name] = _span_count(name, n)
        return n / elapsed

    try:
        for name in configs:  # warm-up
            run(name)
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for name in order:
                rates[name].append(run(name))
            print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rates[n][-1]:6.1f} tok/s" for n in configs),
                  file=sys.stderr, flush=True)
        for tel in configs.values():
            tel.shutdown()  # flush: the export must keep up, not be dropped
    finally:
        sink.terminate()
        sink.wait(timeout=10)

    base = statistics.median(rates["off"])
    print(f"\nstreamgen bench tracing: {args.model} ({args.quantize}), greedy, {args.tokens} tokens, "
          f"{args.rounds} interleaved rounds, median tokens/s, spans exported over OTLP/HTTP\n")
    print("| tracing | spans per request | tokens/s | vs off |")
    print("|---|---|---|---|")
    for name in configs:
        rate = statistics.median(rates[name])
        print(f"| {name} | {spans_per_run[name]} | {rate:.1f} | {(rate / base - 1) * 100:+.1f}% |")
    return 0


def _span_count(detail: str, tokens: int) -> int:
    if detail == "off":
        return 0
    phases = 3  # queue, prefill, and decode or the per-token spans; plus the root
    if detail == "request":
        return 1 + phases
    return 1 + 2 + (tokens - 1) + tokens + tokens  # root, queue, prefill, forwards, samples, detokenizes
