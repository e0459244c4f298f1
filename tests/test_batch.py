"""`streamgen batch`: OpenAI Batch API files through the engine, offline.

Unit: the envelope and body checks, the output file's resume scan, the digest set, the read-ahead
window's order. Tiny model, real processes: a file of good, bad and duplicate lines against the HTTP
API's answers to the same bodies; Ctrl-C and SIGKILL mid-run, then a rerun that completes the rest
exactly once; a file twice the memory bound in bounded memory; the span links; `streamgen bench batch` end to end.
"""

from __future__ import annotations

import io
import json
import re
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from streamgen.batch import files
from streamgen.batch.files import DigestSet, Output, RawLine, count_lines, read_lines, scan
from streamgen.batch.lines import LineError, parse_body, parse_envelope
from streamgen.batch.options import BatchOptions
from streamgen.batch.progress import Progress, Summary, Tally
from streamgen.batch.loop import BatchLoop, Window, _Job
from streamgen.engine.config import EngineConfig
from streamgen.engine.loader import load_model
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import GenerationRequest, choices
from streamgen.errors import ConfigError, ValidationError
from streamgen.server.openai_schema import completion_spec
from streamgen.telemetry.setup import Telemetry

from conftest import CPU
from helpers import wait_until

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def _line(custom_id: str | None, body: dict, url: str = CHAT, method: str = "POST") -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def _envelope(text: str | bytes | None, number: int = 7):
    return parse_envelope(RawLine(number, text.encode() if isinstance(text, str) else text))


def _records(path: Path) -> list[dict]:
    """Every output line, each a whole JSON object (a torn line fails here)."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n") or not raw, "the file ends with a whole line"
    return [json.loads(line) for line in raw.splitlines()]


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("STREAMGEN_", "OTEL_"))}


def _batch_cmd(tiny_cache, tiny_hf_dir, source: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "streamgen", "batch", str(source), "-o", str(output), "--model", str(tiny_hf_dir),
            "--home", str(tiny_cache.home), "--no-pull", "--threads", "1", *extra]


# ---- unit: lines ------------------------------------------------------------------


@pytest.mark.parametrize("text,code,custom_id", [
    ('{"custom_id": "a", "method": "POST"', "invalid_json", None),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": NaN}}', "invalid_json", None),
    ("[1, 2]", "invalid_request", None),
    ('{"method": "POST", "url": "/v1/completions", "body": {}}', "invalid_request", None),
    ('{"custom_id": 5, "method": "POST", "url": "/v1/completions", "body": {}}', "invalid_request", None),
    ('{"custom_id": "\\ud800", "method": "POST", "url": "/v1/completions", "body": {}}', "invalid_request", None),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}', "invalid_request", "a"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}', "invalid_request", "a"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions"}', "invalid_request", "a"),
    (None, "payload_too_large", None),
])
def test_a_line_that_is_no_request_is_an_error_with_a_code(text, code, custom_id) -> None:
    with pytest.raises(LineError) as caught:
        _envelope(text)
    assert caught.value.code == code and caught.value.custom_id == custom_id


def test_a_body_is_checked_as_the_http_api_checks_it() -> None:
    entry = _envelope(_line("a", {"messages": [{"role": "user", "content": "Hi"}], "top_p": 5}))
    with pytest.raises(ValidationError) as caught:
        parse_body(entry)
    assert (caught.value.code, caught.value.param, caught.value.message) == (
        "invalid_parameter", "top_p", "top_p must be in (0, 1], got 5")
    with pytest.raises(ValidationError) as caught:
        parse_body(_envelope(_line("s", {"prompt": "Hi", "stream": True}, COMPLETIONS)))
    assert (caught.value.code, caught.value.param) == ("unsupported", "stream")
    parsed = parse_body(_envelope(_line("c", {"prompt": "Hi", "n": 2, "stream": False}, COMPLETIONS)))
    assert parsed.kind == "completion" and parsed.spec.n == 2


# ---- unit: files ------------------------------------------------------------------


def test_lines_are_read_one_at_a_time_and_overlong_ones_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(files, "MAX_LINE_BYTES", 16)
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"a": 1}\n\n   \n' + b"x" * 40 + b"\n" + b'{"b": 2}')
    lines = list(read_lines(str(source)))
    assert [(r.number, r.data) for r in lines] == [(1, b'{"a": 1}\n'), (4, None), (5, b'{"b": 2}')]
    assert count_lines(str(source)) == 5 and count_lines("-") is None


def test_digest_set_finds_members_before_and_after_merging(monkeypatch) -> None:
    monkeypatch.setattr(DigestSet, "_MERGE_AT", 7)
    seen = DigestSet()
    assert all(seen.add(f"id:{i}") for i in range(100))
    assert not any(seen.add(f"id:{i}") for i in range(100)), "each is a duplicate now"
    assert len(seen) == 100 and "id:5" in seen and "id:100" not in seen and "\ud800" not in seen


def test_a_torn_last_line_is_cut_and_whole_lines_count_as_done(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    out = Output(path)
    out.write({"id": "batch_req_1", "custom_id": "a", "response": {"status_code": 200}, "error": None})
    out.write({"id": "batch_req_2", "custom_id": None, "response": None,
               "error": {"code": "invalid_json", "message": "...", "line": 3}})
    out.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id": "batch_req_3", "custom_id": "b", "resp')  # a write cut short by a kill
    done = scan(path)
    assert path.read_bytes() == whole and done.torn_bytes == len(b'{"id": "batch_req_3", "custom_id": "b", "resp')
    assert done.lines == 2 and done.has_id("a") and done.has_line(3)
    assert not done.has_id("b") and not done.has_line(1)


def test_a_file_that_is_not_a_batch_output_is_not_resumed(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("dear diary\n")
    with pytest.raises(ConfigError, match="not a line of a batch output"):
        scan(path)
    assert path.read_text() == "dear diary\n", "left as it was"


# ---- unit: the read-ahead window ------------------------------------------------------


def _job(prompt_ids: tuple[int, ...], max_tokens: int, n: int = 1) -> _Job:
    parsed = completion_spec({"prompt": "x", "n": n})
    request = GenerationRequest(prompt_ids, SamplingParams(max_tokens=max_tokens), frozenset())
    return _Job(None, parsed, choices(request, n), None)


def test_the_window_groups_shared_prefixes_then_drains_longest_first() -> None:
    window = Window(8, "prefix")
    jobs = [_job((5, 1, 2), 4), _job((3, 9), 50), _job((5, 1), 4), _job((3, 9, 9), 4), _job((1,), 20, n=2)]
    for job in jobs:
        window.push(job)
    assert window.pop() is jobs[4] and window.pop() is jobs[1] and window.pop() is jobs[3]
    window.input_ended()  # in prefix order (5, 1) would come first; now the one with more work does
    assert [window.pop() for _ in range(2)] == [jobs[0], jobs[2]]
    window = Window(8, "longest")
    for job in jobs:
        window.push(job)
    assert [window.pop() for _ in jobs] == [jobs[1], jobs[4], jobs[0], jobs[3], jobs[2]], "equal work: arrival"
    window = Window(2, "arrival")
    window.push(jobs[0])
    assert not window.full
    window.push(jobs[1])
    assert window.full and window.pop() is jobs[0]


def test_the_summary_and_the_periodic_lines() -> None:
    tally = Tally(written=1000, failed=3, skipped=500, prompt_tokens=20000, cached_tokens=5000, output_tokens=40000)
    done = Summary(tally, Path("out.jsonl"), wall_s=40.0, busy_s=30.0, price_per_hour=3.6, interrupted=False)
    assert done.tokens_per_s == 1000 and done.utilisation == 0.75 and done.cost_usd == pytest.approx(0.03)
    assert done.line() == (
        "streamgen batch: done: 1000 requests (3 failed, 500 done before) · prompt 20000 tokens (5000 cached) · "
        "output 40000 tokens · 40.0 s · 1000.0 tok/s · utilisation 75% · cost $0.030000 at $3.6/h, $0.75 per million "
        "output tokens -> out.jsonl")
    stopped = Summary(Tally(written=2), Path("o"), 1.0, 0.5, None, interrupted=True)
    assert stopped.cost_usd is None and stopped.line().startswith("streamgen batch: interrupted: 2 requests (0 failed)")
    assert stopped.line().endswith("run the same command again to resume") and "cost" not in stopped.line()

    stream = io.StringIO()
    progress = Progress(total=2000, initial=500, stream=stream, every_s=0.0)
    progress.update(tally)
    line = stream.getvalue().strip()
    assert line.startswith("streamgen batch: 2000/2000 requests, 3 failed, ") and line.endswith("eta 0s"), line


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="order must be one of prefix, longest, arrival"):
        BatchOptions(order="random")


# ---- tiny model: real processes -------------------------------------------------------

GOOD = {
    "chat": (CHAT, {"model": "x", "messages": [{"role": "user", "content": "The quick brown fox"}], "temperature": 0,
                    "max_tokens": 12, "ignore_eos": True}),
    "completion": (COMPLETIONS, {"prompt": "Paris is the capital", "temperature": 0, "max_tokens": 10,
                                 "ignore_eos": True}),
    "seeded-n2": (CHAT, {"messages": [{"role": "user", "content": "Hello world"}], "temperature": 1.0, "seed": 11,
                         "n": 2, "max_tokens": 8, "ignore_eos": True}),
    "logprobs": (CHAT, {"messages": [{"role": "user", "content": "Numbers: 1 2 3"}], "temperature": 0,
                        "max_completion_tokens": 5, "logprobs": True, "top_logprobs": 2, "ignore_eos": True}),
    "legacy-logprobs": (COMPLETIONS, {"prompt": "def f(x):", "temperature": 0, "max_tokens": 6, "logprobs": 2,
                                      "ignore_eos": True, "stop": ["\n\n"]}),
}
REFUSED = {
    "top-p": (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "top_p": 5}),
    "too-long": (COMPLETIONS, {"prompt": "Hi", "max_tokens": 100000}),
    "tools": (CHAT, {"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}),
}


def test_each_line_gets_one_answer_equal_to_the_http_apis(tiny_model_dir, tiny_cache, tiny_hf_dir, tiny_server,
                                                          tmp_path: Path) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [_line(cid, body, url) for cid, (url, body) in GOOD.items()]
    lines += [_line(cid, body, url) for cid, (url, body) in REFUSED.items()]
    lines += [
        '{"custom_id": "broken", "method": "POST", "url": ',  # bad JSON
        _line("chat", {"prompt": "a duplicate custom_id"}, COMPLETIONS),
        _line("embed", {"input": "x"}, "/v1/embeddings"),
        _line("get", {"prompt": "x"}, COMPLETIONS, method="GET"),
        _line("streamed", {"prompt": "x", "stream": True}, COMPLETIONS),
        "",  # blank lines are not requests
    ]
    source.write_text("\n".join(lines) + "\n")
    result = subprocess.run(_batch_cmd(tiny_cache, tiny_hf_dir, source, output, "--price-per-hour", "3.6"),
                            capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 0, result.stderr
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith("streamgen batch: done: 13 requests (8 failed)") and "cost $" in summary, summary

    records = _records(output)
    assert len(records) == 13, "one output line per input line that is not blank"
    assert Counter(r["custom_id"] for r in records) == Counter(
        [*GOOD, *REFUSED, None, "chat", "embed", "get", "streamed"])
    for r in records:
        assert set(r) == {"id", "custom_id", "response", "error"} and r["id"].startswith("batch_req_")
        assert (r["response"] is None) != (r["error"] is None)
    by_id = {r["custom_id"]: r for r in records if r["error"] is None}
    errors = {(r["custom_id"], r["error"]["code"], r["error"]["line"]) for r in records if r["error"]}
    assert errors == {(None, "invalid_json", 9), ("chat", "invalid_request", 10), ("embed", "invalid_request", 11),
                      ("get", "invalid_request", 12)}

    with tiny_server() as server, httpx.Client(base_url=server.url, timeout=60) as http:
        for cid, (url, body) in {**GOOD, **REFUSED, "streamed": (COMPLETIONS, {"prompt": "x"})}.items():
            response = by_id[cid]["response"]
            if cid == "streamed":
                assert response["status_code"] == 400 and response["body"]["error"]["param"] == "stream"
                continue
            reply = http.post(url, json=body)
            assert response["status_code"] == reply.status_code, cid
            expected = reply.json()
            if reply.status_code != 200:
                assert response["body"] == expected, cid
                continue
            answer = response["body"]
            assert response["request_id"] == answer["id"] and answer["id"].split("-")[0] == expected["id"].split("-")[0]
            assert (answer["object"], answer["model"]) == (expected["object"], expected["model"])
            assert answer["choices"] == expected["choices"], cid
            for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
                assert answer["usage"][field] == expected["usage"][field], (cid, field)
            assert answer["usage"]["cost_usd"] > 0 and "cost_usd" not in expected["usage"], "priced in batch only"


def _input(path: Path, count: int, max_tokens: int) -> list[str]:
    ids = [f"q{i:05d}" for i in range(count)]
    path.write_text("".join(_line(cid, {"prompt": f"Question {i}: the quick brown fox", "temperature": 0,
                                        "max_tokens": max_tokens, "ignore_eos": True}, COMPLETIONS) + "\n"
                            for i, cid in enumerate(ids)))
    return ids


def _run_until(cmd: list[str], output: Path, lines: int, sig: int) -> subprocess.CompletedProcess:
    """Start the batch, send sig once `lines` answers are written; its result."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    def written() -> bool:
        assert proc.poll() is None, proc.communicate()[1]
        return output.exists() and output.read_bytes().count(b"\n") >= lines

    wait_until(written, 120, f"{lines} answers written", interval=0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["sigint", "sigkill"])
def test_an_interrupted_batch_resumes_and_answers_each_request_once(tiny_model_dir, tiny_cache, tiny_hf_dir,
                                                                    tmp_path: Path, sig) -> None:
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = _input(source, 600, 30)
    cmd = _batch_cmd(tiny_cache, tiny_hf_dir, source, output)
    stopped = _run_until(cmd, output, 40, sig)
    if sig == signal.SIGINT:
        assert stopped.returncode == 130, stopped.stderr
        last = stopped.stderr.strip().splitlines()[-1]
        assert last.startswith("streamgen batch: interrupted: ") and "run the same command again" in last, last
    else:
        assert stopped.returncode == -signal.SIGKILL
        with open(output, "ab") as f:  # what a kill in the middle of a write leaves
            f.write(b'{"id":"batch_req_torn","custom_id":"q0')
    first = _records(output) if sig == signal.SIGINT else [json.loads(x) for x in output.read_bytes().splitlines()[:-1]]
    assert 40 <= len(first) < len(ids), "stopped mid-run"
    assert len({r["custom_id"] for r in first}) == len(first) and all(r["error"] is None for r in first)

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(first)} done before" in resumed.stderr.strip().splitlines()[-1]
    records = _records(output)
    assert records[: len(first)] == first, "what was written stays as it was"
    assert sorted(r["custom_id"] for r in records) == ids, "every request answered exactly once"
    assert all(r["response"]["status_code"] == 200 for r in records)
    assert {r["response"]["body"]["usage"]["completion_tokens"] for r in records} == {30}

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert again.returncode == 0 and f"0 requests (0 failed, {len(ids)} done before)" in again.stderr
    assert _records(output) == records


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_file_larger_than_the_memory_bound_runs_in_bounded_memory(tiny_model_dir, tiny_cache, tiny_hf_dir,
                                                                     tmp_path: Path) -> None:
    """The peak RSS of a run over a ~100 MB file against that of a run over a file a thirteenth its size. Each
    line carries 8 KB the API ignores (as long prompts would), so the large file is twice the bound: a reader
    that kept what it read, lines or bodies, would pass it. The window, the engine's slots and the telemetry
    are bounded; what grows with the file is 8 bytes per custom_id. 50 MB leaves room for the allocator's own
    moods."""

    def peak_rss_mb(count: int) -> float:
        source, output = tmp_path / f"in{count}.jsonl", tmp_path / f"out{count}.jsonl"
        with open(source, "w") as f:
            for i in range(count):
                f.write(_line(f"r{i}", {"prompt": f"Question {i}", "temperature": 0, "max_tokens": 1 + i % 2,
                                        "metadata": {"note": "x" * 8192}}, COMPLETIONS) + "\n")
        proc = subprocess.Popen(_batch_cmd(tiny_cache, tiny_hf_dir, source, output), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=_env())
        peak = 0.0
        while proc.poll() is None:
            try:
                peak = max(peak, _rss_mb(proc.pid, "VmHWM"))  # the kernel's own high-water mark
            except (FileNotFoundError, ProcessLookupError, AssertionError):
                break
            time.sleep(0.05)
        stderr = proc.communicate()[1]
        assert proc.returncode == 0, stderr
        assert f"streamgen batch: done: {count} requests (0 failed)" in stderr
        with open(output, "rb") as f:
            assert sum(1 for _ in f) == count
        return peak

    small, large = peak_rss_mb(1_000), peak_rss_mb(13_000)
    assert (tmp_path / "in13000.jsonl").stat().st_size > 2 * 50 * 2**20
    assert small > 0 and large - small < 50, f"peak RSS {large:.0f} MB over 100 MB of input, {small:.0f} MB over 8"


def test_every_request_span_links_to_the_batch_span(tiny_model_dir, tmp_path: Path) -> None:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry.from_env(env={}, span_processors=[SimpleSpanProcessor(exporter)])
    model = load_model(tiny_model_dir, CPU)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    ids = _input(source, 5, 3)
    out, done = Output.resume(output)
    summary = BatchLoop(model, EngineConfig(), telemetry, out, done).run(read_lines(str(source)))
    out.close()
    assert summary.tally.written == 5 and not summary.interrupted
    spans = exporter.get_finished_spans()
    (batch,) = [s for s in spans if s.name == "batch"]
    requests = [s for s in spans if s.name.startswith("text_completion ")]
    assert len(requests) == 5 and {s.context.trace_id for s in requests}.isdisjoint({batch.context.trace_id})
    for span in requests:
        (link,) = span.links
        assert link.context.span_id == batch.context.span_id and link.attributes["streamgen.batch.custom_id"] in ids
    assert batch.attributes["streamgen.batch.requests"] == 5 and summary.busy_s > 0


def test_a_stop_between_lines_is_an_interruption(tiny_model_dir, tmp_path: Path) -> None:
    model = load_model(tiny_model_dir, CPU)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"bad json\n' * 50)
    out, done = Output.resume(output)
    lines_read = []

    def stop() -> bool:  # after ten lines, none of which needs the engine
        return len(lines_read) >= 10

    def lines():
        for raw in read_lines(str(source)):
            lines_read.append(raw.number)
            yield raw

    summary = BatchLoop(model, EngineConfig(), Telemetry.from_env(env={}), out, done).run(lines(), stop)
    out.close()
    assert summary.interrupted and summary.tally.written == summary.tally.failed == 10
    assert "interrupted" in summary.line()


def test_bench_batch_runs_end_to_end_on_the_tiny_model(tiny_model_dir, tiny_cache, tiny_hf_dir,
                                                       tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "streamgen", "bench", "batch", "--model", str(tiny_hf_dir), "--home",
         str(tiny_cache.home), "--requests", "24", "--clients", "4", "--rounds", "2", "--decode-requests", "16",
         "--order-requests", "24", "--threads", "1", "--json", str(report)],
        capture_output=True, text=True, timeout=300, env=_env())
    assert result.returncode == 0, result.stderr
    assert "batch / WebSocket clients: " in result.stdout and "decode-heavy batch / raw batch-16" in result.stdout
    assert "| prefix | " in result.stdout and "| arrival | " in result.stdout
    figures = json.loads(report.read_text())
    sides = ("batch", "websocket", "decode", "prefix", "longest", "arrival")
    assert [len(figures["runs"][side]) for side in sides] == [2] * len(sides)
    for run in figures["runs"]["batch"] + figures["runs"]["websocket"]:
        assert run["requests"] == 24 and run["failed"] == 0 and run["tokens_per_s"] > 0
        assert run["cost_per_million_tokens_usd"] > 0
    for run in figures["runs"]["prefix"] + figures["runs"]["arrival"]:
        assert run["requests"] == 24 and run["failed"] == 0 and 0 < run["cached_tokens"] < run["prompt_tokens"]
    assert figures["batch_over_websocket"] > 0 and figures["decode_over_raw"] > 0


def test_request_lines_carry_structured_output_and_tools(tiny_model_dir, tmp_path: Path) -> None:
    """The OpenAI fields for structured output and tools work in batch lines as on the HTTP API: a choice is
    one of its options, a regex matches, tools are taken (and described in the prompt: on the tiny model's
    256-token context that no longer fits, which says they were), and a schema that cannot be used is a 400 line
    naming its field. Calls read back from answers are tested on the real model (tests/test_structured.py):
    batch lines and the HTTP API answer through the same code."""
    model = load_model(tiny_model_dir, CPU)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "maximum": 9}}, "required": ["n"]}}}
    source.write_text("\n".join([
        _line("choice", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20,
                         "structured_outputs": {"choice": ["yes", "no"]}}),
        _line("regex", {"prompt": "Hi", "max_tokens": 20, "structured_outputs": {"regex": "[0-9]{3}"}}, COMPLETIONS),
        _line("tool", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40, "tools": [tool],
                       "tool_choice": "required", "parallel_tool_calls": False}),
        _line("bad", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                      "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}}),
    ]) + "\n")
    out, done = Output.resume(output)
    BatchLoop(model, EngineConfig(), Telemetry.from_env(env={}), out, done).run(read_lines(str(source)))
    out.close()
    by_id = {r["custom_id"]: r["response"] for r in _records(output)}
    assert by_id["choice"]["body"]["choices"][0]["message"]["content"] in ("yes", "no")
    assert re.fullmatch("[0-9]{3}", by_id["regex"]["body"]["choices"][0]["text"])
    assert by_id["tool"]["body"]["error"]["code"] == "context_length_exceeded"
    assert by_id["bad"]["status_code"] == 400 and by_id["bad"]["body"]["error"]["param"] == "response_format"
