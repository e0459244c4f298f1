"""`streamgen bench peers`: the command end to end on the tiny model, and the llama-server driver.

The driver is checked against a stand-in llama-server (a small Python HTTP server that records its command
line and the bodies it receives), so no llama.cpp build is needed.
"""

from __future__ import annotations

import asyncio
import json
import stat
import sys
from pathlib import Path

import pytest

from streamgen.bench import llama_server as llama
from streamgen.bench.peers import measure, workload
from streamgen.bench.clients import Streamed, decode_rate
from streamgen.errors import ConfigError

# A stand-in for llama-server: `--version` on stderr, /health 503 for the first two polls then 200, and
# /v1/chat/completions streamed as llama-server streams it (a role chunk, one chunk per token, the finish
# chunk, the usage chunk, [DONE]). It appends its argv and every body to the file in $FAKE_LLAMA_RECORD.
FAKE_LLAMA_SERVER = '''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

if "--version" in sys.argv:
    print("version: 1234 (fake)", file=sys.stderr)
    sys.exit(0)
record = os.environ["FAKE_LLAMA_RECORD"]
with open(record, "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:]}) + "\\n")
polls = [0]

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        polls[0] += 1
        self.send_response(200 if self.path == "/health" and polls[0] > 2 else 503)
        self.end_headers()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(record, "a") as f:
            f.write(json.dumps({"path": self.path, "body": body}) + "\\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        def send(obj):
            self.wfile.write(f"data: {json.dumps(obj)}\\n\\n".encode())
            self.wfile.flush()
        send({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]})
        for i in range(body["max_tokens"]):
            time.sleep(0.001)
            send({"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]})
        send({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        send({"choices": [], "usage": {"completion_tokens": body["max_tokens"], "prompt_tokens": 7}})
        self.wfile.write(b"data: [DONE]\\n\\n")

class Server(ThreadingHTTPServer):
    request_queue_size = 64  # 16 clients connect at once; the default backlog of 5 resets some of them

port = int(sys.argv[sys.argv.index("--port") + 1])
Server(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def fake_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the stand-in binary, the file it records into)."""
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!{sys.executable}\n{FAKE_LLAMA_SERVER}")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "record.jsonl"
    monkeypatch.setenv("FAKE_LLAMA_RECORD", str(record))
    return binary, record


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_level(row: dict) -> None:
    assert row["requests"] > 0 and row["failed"] == 0, row["errors"]
    assert row["errors"] == []
    assert row["output_tokens"] == row["requested_tokens"], "ignore_eos: every request ran to its max_tokens"
    assert row["tokens_per_s"] > 0 and all(r > 0 for r in row["round_tokens_per_s"])
    for figures in (row["ttft_ms"], row["itl_ms"]):
        # Tokens can arrive within the same millisecond: a gap of 0 ms is a measurement, not an error.
        assert 0 <= figures["p50"] <= figures["p95"] <= figures["p99"], figures


# ---- the command on the tiny model -------------------------------------------------------------------------


def test_peers_bench_end_to_end_without_llama_server(tiny_hf_dir, tiny_model_dir, tiny_cache, tmp_path, capsys,
                                                     monkeypatch) -> None:
    """No peer given: streamgen alone over its WebSocket, every request served, the figures consistent with
    what the server reported, and the arrive-together share measured against the engine in-process."""
    from streamgen.cli import main

    monkeypatch.delenv(llama.LLAMA_SERVER_ENV, raising=False)
    out, png = tmp_path / "peers.json", tmp_path / "peers.png"
    assert main(["bench", "peers", "--model", str(tiny_hf_dir), "--home", str(tiny_cache.home),
                 "--levels", "1,2", "--duration", "2", "--rounds", "1", "--prompt-tokens", "5,20,40",
                 "--max-tokens", "8,16", "--together-tokens", "16", "--together-prompt-tokens", "8",
                 "--itl-sweep", "0,5", "--json", str(out), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "llama-server: not run" in printed and "| streamgen | 2 |" in printed
    data = json.loads(out.read_text())
    assert data["config"]["llama_server"] is None and data["ratios"] == []
    assert data["config"]["streamgen_transport"] == "websocket" and data["config"]["prefix_cache"] == "off"
    assert [p >= t for p, t in zip(data["config"]["prompt_tokens"], [5, 20, 40], strict=True)] == [True] * 3
    assert [(r["server"], r["concurrency"]) for r in data["levels"]] == [("streamgen", 1), ("streamgen", 2)]
    for row in data["levels"]:
        _check_level(row)
        assert row["arrivals"] == row["output_tokens"], "one WebSocket token message per token the server counted"
    together = data["together"]
    assert together["requests"] == 16 and together["failed"] == 0 and together["llama_tok_s"] == []
    assert len(together["engine_tok_s"]) == len(together["server_tok_s"]) == 1
    assert min(together["engine_tok_s"]) > 0 and min(together["server_tok_s"]) > 0
    assert together["share"] == pytest.approx(together["server_tok_s"][0] / together["engine_tok_s"][0], rel=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = data["itl_sweep"]
    assert [(r["server"], r["concurrency"]) for r in sweep] == [("streamgen itl off", 2), ("streamgen itl 5 ms", 2)]
    for row in sweep:
        _check_level(row)
    assert "| streamgen itl 5 ms |" in printed


def test_peers_bench_with_a_stand_in_llama_server_over_sse(tiny_hf_dir, tiny_model_dir, tiny_cache, tmp_path,
                                                           capsys, fake_llama) -> None:
    """The peer path through the whole command: the stand-in is started with the documented command line, gets
    the workload's bodies (caching off, greedy, ignore_eos), is measured like streamgen (here over SSE too),
    the ratios are computed, and it is stopped at the end."""
    from streamgen.cli import main

    binary, record = fake_llama
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "peers.json"
    assert main(["bench", "peers", "--model", str(tiny_hf_dir), "--home", str(tiny_cache.home),
                 "--llama-server", str(binary), "--gguf", str(gguf), "--streamgen-transport", "sse",
                 "--levels", "1,16", "--duration", "1", "--rounds", "2", "--prompt-tokens", "5,20",
                 "--max-tokens", "4,8", "--together", "4", "--together-tokens", "8",
                 "--together-prompt-tokens", "8", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "llama-server 1234 (fake)" in printed and "| 16 | inter-token p95 (ms) |" in printed
    data = json.loads(out.read_text())
    assert data["config"]["transports"] == {"streamgen": "SSE /v1/chat/completions",
                                            "llama-server": "SSE /v1/chat/completions"}
    assert [(r["server"], r["concurrency"]) for r in data["levels"]] == [
        ("streamgen", 1), ("llama-server", 1), ("streamgen", 16), ("llama-server", 16)]
    for row in data["levels"]:
        _check_level(row)
        assert len(row["round_tokens_per_s"]) == 2
        # SSE skips a token whose text is held back (part of a character), so arrivals can only be fewer.
        assert 0 < row["arrivals"] <= row["output_tokens"]
    assert [(x["concurrency"], x["measure"]) for x in data["ratios"]] == [
        (16, "tokens_per_s"), (16, "ttft_p50"), (16, "itl_p95"), (1, "tokens_per_s")]
    assert data["together"]["failed"] == 0 and len(data["together"]["llama_tok_s"]) == 2

    rows = _records(record)
    assert rows[0]["argv"] == ["-m", str(gguf), "-c", "32768", "-np", "16", "-t", "2", "--host", "127.0.0.1",
                               "--port", rows[0]["argv"][-1]]
    bodies = [r["body"] for r in rows[1:]]
    assert bodies and all(r["path"] == "/v1/chat/completions" for r in rows[1:])
    for body in bodies:
        assert body["cache_prompt"] is False and body["ignore_eos"] is True and body["temperature"] == 0
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["max_tokens"] in (4, 8) and body["messages"][0]["role"] == "user"
    with pytest.raises(OSError):  # stopped: nothing listens on its port any more
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{rows[0]['argv'][-1]}/health", timeout=2)


# ---- the pieces, without a model -----------------------------------------------------------------------------


def test_llama_server_command_line() -> None:
    cmd = llama.llama_server_command(Path("/opt/llama-server"), Path("/tmp/m.gguf"), 4321, context=32768,
                                     parallel=16, threads=2)
    assert cmd == ["/opt/llama-server", "-m", "/tmp/m.gguf", "-c", "32768", "-np", "16", "-t", "2",
                   "--host", "127.0.0.1", "--port", "4321"]
    auto = llama.llama_server_command(Path("ls"), Path("m.gguf"), 1, context=2048, parallel=1, threads=0)
    assert "-t" not in auto, "threads 0 leaves the choice to llama-server"


def test_request_bodies() -> None:
    body = workload.llama_body("Hello there", 64, cache_prompt=False)
    assert body == {"model": "bench", "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0,
                    "max_tokens": 64, "ignore_eos": True, "cache_prompt": False}
    assert workload.llama_body("x", 32, cache_prompt=True)["cache_prompt"] is True
    ours = workload.streamgen_body("Hello there", 64)
    assert {k: v for k, v in body.items() if k != "cache_prompt"} == ours, "the same request to both servers"
    frame = workload.streamgen_frame("c0-1", "Hello there", 64)
    assert frame == {"type": "generate", "id": "c0-1", "messages": ours["messages"],
                     "params": {"temperature": 0, "max_tokens": 64, "ignore_eos": True}}
    # A base model (no chat template): the same prompt as plain text, to /v1/completions and the WebSocket's prompt.
    plain = workload.llama_body("Hello there", 64, cache_prompt=False, chat=False)
    assert plain["prompt"] == "Hello there" and "messages" not in plain
    assert {k: v for k, v in plain.items() if k != "cache_prompt"} == workload.streamgen_body("Hello there", 64, False)
    assert workload.streamgen_frame("c0-1", "Hello there", 64, False)["prompt"] == "Hello there"
    assert (workload.openai_path(True), workload.openai_path(False)) == ("/v1/chat/completions", "/v1/completions")


def test_llama_server_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    exe = tmp_path / "llama-server"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    other = tmp_path / "other"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    assert llama.resolve_llama_server(None, {}) is None
    assert llama.resolve_llama_server(None, {llama.LLAMA_SERVER_ENV: ""}) is None
    assert llama.resolve_llama_server(None, {llama.LLAMA_SERVER_ENV: str(exe)}) == exe
    assert llama.resolve_llama_server(str(other), {llama.LLAMA_SERVER_ENV: str(exe)}) == other, "the flag wins"
    plain = tmp_path / "not-executable"
    plain.write_text("")
    for flag, env in ((str(plain), {}), (None, {llama.LLAMA_SERVER_ENV: str(tmp_path / "missing")})):
        with pytest.raises(ConfigError, match="not an executable file"):
            llama.resolve_llama_server(flag, env)


def test_the_stand_in_server_through_the_driver(fake_llama, tmp_path: Path) -> None:
    """LlamaServer waits through the 503s of a loading model, the SSE client reads the stream with its usage,
    and stop() ends the process."""
    binary, record = fake_llama
    server = llama.LlamaServer(binary, tmp_path / "m.gguf", context=4096, parallel=2, threads=1)
    try:
        server.wait_ready(timeout=30)
        target = workload.llama_target(server, cache_prompt=True)
        result = asyncio.run(target.send("r1", "Hello", 5))
    finally:
        server.stop()
    assert server.proc.returncode is not None
    assert result.ok and result.tokens == 5 and result.reported_tokens == 5 and result.ttft_s > 0
    body = _records(record)[1]["body"]
    assert body["cache_prompt"] is True and body["max_tokens"] == 5
    assert llama.llama_server_version(binary) == "1234 (fake)"


def _streamed(sent: float, stamps: list[float], reported: int | None, ok: bool = True) -> Streamed:
    final = {"usage": {"completion_tokens": reported}} if reported is not None else {}
    return Streamed(ok, sent, stamps, final)


def test_summarize_pools_the_rounds() -> None:
    a = measure.LevelRun("streamgen", 2, 0, [measure.Sent(3, _streamed(0.0, [0.1, 0.2, 0.3], 3)),
                                           measure.Sent(4, _streamed(0.0, [], None, ok=False))], wall_s=1.0)
    b = measure.LevelRun("streamgen", 2, 1, [measure.Sent(2, _streamed(0.0, [0.2, 0.5], 2))], wall_s=2.0)
    row = measure.summarize([a, b])
    assert (row.requests, row.failed, row.output_tokens, row.arrivals, row.requested_tokens) == (3, 1, 5, 5, 5)
    assert row.tokens_per_s == round(5 / 3, 1) and row.round_tokens_per_s == [3.0, 1.0]
    assert row.ttft_ms["p50"] == 150.0 and row.itl_ms["p50"] == 100.0
    assert len(row.errors) == 1
    # A server that reports no usage is counted by what arrived.
    assert _streamed(0.0, [0.1, 0.2], None).output_tokens == 2


def test_decode_rate_counts_the_servers_tokens_not_the_chunks() -> None:
    # 11 tokens in 6 chunks (text held back until its characters are whole), the last at 0.5 s,
    # the final message at 0.6 s: 10 tokens after the first in 0.5 s.
    held = Streamed(True, 0.0, [0.1, 0.2, 0.3, 0.4, 0.45, 0.5], {"usage": {"completion_tokens": 11}}, ended=0.6)
    assert decode_rate(held) == pytest.approx(20.0)
    # No usage reported: the chunks are the tokens, timed to the last one.
    assert decode_rate(Streamed(True, 0.0, [0.1, 0.2, 0.3], {})) == pytest.approx(10.0)
    assert decode_rate(Streamed(False, 0.0, [0.1, 0.2, 0.3], {})) is None
    assert decode_rate(Streamed(True, 0.0, [0.1], {})) is None


def _level(server: str, clients: int, tok_s: float, ttft50: float, itl95: float) -> measure.LevelResult:
    figures = {"p50": ttft50, "p95": ttft50, "p99": ttft50}
    return measure.LevelResult(server, clients, 1, 0, 1, 1, 1, tok_s, [tok_s], figures,
                             {"p50": itl95, "p95": itl95, "p99": itl95}, [])


def test_ratios_against_the_targets() -> None:
    results = [_level("streamgen", 1, 90, 70, 13), _level("llama-server", 1, 60, 200, 13.5),
               _level("streamgen", 16, 196, 400, 230), _level("llama-server", 16, 80, 3700, 125)]
    got = {(x.concurrency, x.measure): x for x in measure.ratios(results)}
    assert list(got) == [(16, "tokens_per_s"), (16, "ttft_p50"), (16, "itl_p95"), (1, "tokens_per_s")]
    assert got[16, "tokens_per_s"].ratio == 2.45 and got[16, "tokens_per_s"].met
    assert got[16, "ttft_p50"].met and got[16, "ttft_p50"].target == "<= 0.5x"
    assert got[16, "itl_p95"].ratio == 1.84 and not got[16, "itl_p95"].met
    assert got[1, "tokens_per_s"].met
    assert measure.ratios(results[:2]) == [got[1, "tokens_per_s"]], "only levels both servers ran"


def test_burst_rate_runs_from_the_first_send_to_the_last_arrival() -> None:
    burst = [_streamed(10.0, [10.5, 11.0], 2), _streamed(10.2, [10.6, 12.0], 4), _streamed(10.1, [], None, False)]
    assert measure.burst_rate(burst) == pytest.approx(6 / 2.0)
    assert measure.burst_rate([_streamed(0.0, [], None, False)]) == 0.0


def test_prompts_grow_to_their_token_counts() -> None:
    words = [f"w{i}" for i in range(500)]
    encode = lambda text: text.split() * 2  # noqa: E731 - two tokens a word
    prompts = workload.sized_prompts(encode, [10, 40, 101], words)
    assert [len(encode(p)) for p in prompts] == [10, 40, 102]
    assert len({p.split()[0] for p in prompts}) == 3, "each from its own offset"


def test_the_default_gguf_comes_from_the_cached_wheel(tmp_path: Path) -> None:
    """The pinned wheel is taken from $STREAMGEN_HOME/downloads when it is there (no download)."""
    from streamgen.model_files import CacheLayout, streamgen_home
    from streamgen.models.sources import DEFAULT_WHEEL

    wheel = CacheLayout(streamgen_home()).downloads / DEFAULT_WHEEL.wheel_name
    if not wheel.is_file():
        pytest.skip(f"{wheel} is not cached (streamgen pull fetches it)")
    home = tmp_path / "home"
    (home / "downloads").mkdir(parents=True)
    (home / "downloads" / wheel.name).symlink_to(wheel)
    gguf = llama.default_gguf(str(home), tmp_path)
    assert gguf == tmp_path / Path(DEFAULT_WHEEL.member).name and gguf.read_bytes()[:4] == b"GGUF"



def test_the_peer_gets_the_models_own_gguf_or_a_clear_error(tmp_path: Path) -> None:
    """A model that is not from a GGUF has no file of the same weights for llama-server: --gguf is asked for."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--gguf PATH"):
        llama.default_gguf(str(tmp_path / "home"), tmp_path, str(hf))
    # A GGUF given by its path is used where it is, and its type named from its file name.
    own = tmp_path / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    own.write_bytes(b"GGUF")
    assert llama.default_gguf(str(tmp_path / "home"), tmp_path / "x", str(own)) == own
    assert llama._gguf_type(own) == "Q4_K_M"  # noqa: SLF001 - the pairing's name
    assert llama._gguf_type(Path("SmolLM2-135M-Instruct-Q4_1.gguf")) == "Q4_1"  # noqa: SLF001
