"""`streamgen cluster` end to end: real `streamgen serve` replicas (the tiny model) behind real HAProxy, on
loopback, started as a user starts them (`streamgen cluster` as a process, its ready line read from stderr).

- affinity: each conversation (a prompt_cache_key or a user) stays on one replica, whose prefix cache serves
  every turn after the first; several conversations reach every replica;
- a replica killed (SIGKILL) mid-stream cuts only its own streams, cleanly, and every new request is answered
  by the others (HAProxy retries failed connections, then takes the replica out);
- a replica stopped with SIGTERM finishes its running stream and gets no new request;
- the WebSocket passes HAProxy; rate limits count the client HAProxy forwards, never the balancer itself or a
  client's own X-Forwarded-For;
- start-up failures end in one error line; SIGTERM stops the cluster, replicas first.

No timing is asserted: every wait is bounded (wait_until, read timeouts) and fails by naming what did not
happen.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from signal import SIGKILL
from pathlib import Path

import httpx
import pytest
import websockets

from helpers import wait_until
from streamgen.cluster import (
    CHECKOUT_CONFIG, DATA_DIR, SET_BY_CLUSTER, config_candidates, find_config, haproxy_binary, render_config,
    replica_threads, serve_flags,
)
from streamgen.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
LONG = 200  # tokens of a stream that must still run when its replica is signalled (the context is 256)


def _haproxy() -> str:
    try:
        return haproxy_binary()
    except ConfigError as exc:
        if os.environ.get("CI"):
            pytest.fail(exc.message)
        pytest.skip(exc.message)


class ClusterProcess:
    """`streamgen cluster` on the tiny model, its stderr kept (JSON lines) and its ready line parsed."""

    def __init__(self, hf_dir: Path, home: Path, *flags: str, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "streamgen", "cluster", "--model", str(hf_dir), "--home", str(home),
               "--quantize", "none", "--no-pull", "--port", "0", "--log-format", "json", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url = ""
        self.replica_urls: list[str] = []

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def events(self, name: str) -> list[dict]:
        found = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    def wait_ready(self, timeout: float = 150) -> ClusterProcess:
        ready = wait_until(lambda: self.events("cluster.ready") or self.proc.poll() is not None, timeout,
                           "the cluster's ready line")
        assert ready is not True and self.proc.poll() is None, "\n".join(self.lines[-30:])
        (line,) = ready
        self.url = line["url"]
        self.replica_urls = line["replicas"].split(",")
        return self

    def output(self) -> str:
        return "\n".join(self.lines)

    def replica_pid(self, name: str) -> int:
        """The pid of replica `name` (a child of the cluster, started with --replica-id name)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == self.proc.pid and b"serve" in argv and b"--replica-id" in argv \
                    and argv[argv.index(b"--replica-id") + 1] == name.encode():
                return int(entry.name)
        raise AssertionError(f"no replica {name} under the cluster")

    def server_status(self) -> dict[str, str]:
        import csv
        import io

        text = httpx.get(self.url + "/haproxy/stats;csv", timeout=5).text
        return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text.lstrip("# ")))
                if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")}

    def idle(self) -> bool:
        """HAProxy has no request in flight to any replica (so bounded load sends a key to its own replica)."""
        import csv
        import io

        text = httpx.get(self.url + "/haproxy/stats;csv", timeout=5).text
        return all(row["scur"] == "0" for row in csv.DictReader(io.StringIO(text.lstrip("# ")))
                   if row["pxname"] == "replicas" and row["svname"] != "BACKEND")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)
        self.proc.stderr.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def cluster(tiny_hf_dir: Path, tiny_cache, tiny_model_dir: Path) -> Iterator[ClusterProcess]:
    _haproxy()
    # One KV slot each: a replica's backlog then keeps a stream running for as long as a test needs.
    c = ClusterProcess(tiny_hf_dir, tiny_cache.home, "--replicas", "3", "--rate-limit", "0", "--max-batch", "1",
                       "--shutdown-grace", "30")
    try:
        yield c.wait_ready()
    finally:
        c.stop()


def _chat(url: str, body: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json={"model": "m", "temperature": 0, **body},
                      headers=headers, timeout=30)


def _replica(response: httpx.Response) -> str:
    return response.headers["x-streamgen-replica"]


# --- unit: the pieces of the command -------------------------------------------------------------


def test_render_appends_one_checked_server_per_replica_to_the_last_section() -> None:
    base = CHECKOUT_CONFIG.read_text()
    text = render_config(base, [("r1", "127.0.0.1", 8101), ("r2", "127.0.0.1", 8102)])
    assert text.startswith(base.rstrip("\n")) and text.endswith(
        "\n    server r1 127.0.0.1:8101 check\n    server r2 127.0.0.1:8102 check\n")
    rr = render_config(base, [("r1", "127.0.0.1", 8101)], balance="roundrobin")
    assert "    balance roundrobin\n" in rr and "balance hash var" not in rr
    assert rr.replace("balance roundrobin", "balance hash var(txn.key)") == render_config(base, [("r1", "127.0.0.1",
                                                                                                  8101)])
    with pytest.raises(ValueError):
        render_config("backend replicas\n", [], balance="roundrobin")


def test_the_config_is_found_in_the_checkout_or_the_install_prefix(tmp_path: Path) -> None:
    assert find_config() == CHECKOUT_CONFIG
    assert Path(sys.prefix) / DATA_DIR / "haproxy.cfg" in config_candidates()
    with pytest.raises(ConfigError, match="--haproxy-config .*: no such file"):
        find_config(tmp_path / "missing.cfg")


def test_missing_haproxy_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="apt-get install haproxy"):
        haproxy_binary()


def test_settings_pass_through_and_threads_split() -> None:
    assert serve_flags({"max_batch": 4, "log_prompts": False, "model": "m"}) == [
        "--max-batch", "4", "--no-log-prompts", "--model", "m"]
    for name in SET_BY_CLUSTER:
        with pytest.raises(ValueError):
            serve_flags({name: 1})
    assert [replica_threads(n, cores=8) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]


class _Proc:
    def __init__(self, returncode: int | None) -> None:
        self.returncode = returncode

    def poll(self) -> int | None:
        return self.returncode


def test_haproxy_lines_are_logged_by_weight() -> None:
    """Alerts as errors, notices as warnings, except about a replica whose exit the cluster already said (and
    while it stops them all); the request log at debug level only."""
    from structlog.testing import capture_logs

    from streamgen.cluster import Cluster, Replica, _Child

    cluster = Cluster(2, [], port=0, haproxy="/bin/true", config=CHECKOUT_CONFIG)
    cluster.replicas = [Replica("r1", _Proc(None)), Replica("r2", _Proc(-9))]
    child = _Child("haproxy", _Proc(None))
    with capture_logs() as logs:
        cluster._haproxy_notice(child, "[WARNING]  (7) : Server replicas/r1 is DOWN, reason: Layer7 wrong status")
        cluster._haproxy_notice(child, "[WARNING]  (7) : Server replicas/r2 is DOWN, reason: Layer4 connection problem")
        cluster._haproxy_notice(child, "[ALERT]    (7) : backend 'replicas' has no server available!")
        cluster._haproxy_log(child, "127.0.0.1:5 [06/Dec/2026:04:20:22.1] streamgen replicas/r1 0/0/0/1/2 200 359")
        cluster._stopping.set()
        cluster._haproxy_notice(child, "[WARNING]  (7) : Server replicas/r1 is DOWN, reason: Layer4 connection problem")
    assert [(e["log_level"], e["event"]) for e in logs] == [
        ("warning", "haproxy.notice"), ("debug", "haproxy.notice"), ("error", "haproxy.alert"),
        ("debug", "haproxy.log"), ("debug", "haproxy.notice")]
    assert logs[0]["message"] == "Server replicas/r1 is DOWN, reason: Layer7 wrong status"


# --- the command, on real processes --------------------------------------------------------------


def test_affinity_keeps_each_conversation_on_one_replica_with_its_cache(cluster: ClusterProcess) -> None:
    questions = ["Hello there", "And then?", "Why so?"]
    for c in range(4):
        key = {"prompt_cache_key": f"conversation-{c}"} if c % 2 else {"user": f"user-{c}"}
        messages: list[dict] = []
        replicas, cached = [], []
        for turn, question in enumerate(questions):
            messages.append({"role": "user", "content": f"{c}: {question}" if turn == 0 else question})
            wait_until(cluster.idle, 10, "HAProxy idle")
            r = _chat(cluster.url, {**key, "messages": messages, "max_tokens": 6})
            assert r.status_code == 200, r.text
            body = r.json()
            replicas.append(_replica(r))
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
        assert len(set(replicas)) == 1, (key, replicas)
        assert all(n > 0 for n in cached[1:]), (key, cached)


def test_conversations_spread_over_every_replica(cluster: ClusterProcess) -> None:
    seen = set()
    for k in range(24):
        wait_until(cluster.idle, 10, "HAProxy idle")
        r = _chat(cluster.url, {"prompt_cache_key": f"spread-{k}", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 1})
        assert r.status_code == 200, r.text
        seen.add(_replica(r))
    assert seen == {"r1", "r2", "r3"}


def test_a_websocket_stream_passes_haproxy(cluster: ClusterProcess) -> None:
    async def run() -> tuple[str, list[dict]]:
        url = cluster.url.replace("http://", "ws://") + "/v1/ws"
        async with websockets.connect(url, additional_headers={"X-Session-Id": "ws-session"}) as ws:
            await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "Hello", "params": {"max_tokens": 8}}))
            msgs = []
            while not msgs or msgs[-1]["type"] not in ("done", "error"):
                msgs.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            return ws.response.headers["x-streamgen-replica"], msgs

    replica, msgs = asyncio.run(run())
    assert replica in ("r1", "r2", "r3")
    assert msgs[0]["type"] == "start" and msgs[-1]["type"] == "done", msgs
    tokens = [m for m in msgs if m["type"] == "token"]
    assert tokens and msgs[-1]["usage"]["completion_tokens"] == len(tokens)


def _open_stream(url: str, key: str, max_tokens: int = LONG):
    """A streamed chat request, opened and read up to its first event (the role chunk: the replica accepted it
    and the stream is running, possibly still queued): (client, response, line iterator)."""
    client = httpx.Client(timeout=httpx.Timeout(15))
    body = {"model": "m", "prompt_cache_key": key, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}
    response = client.send(client.build_request("POST", url + "/v1/chat/completions", json=body), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: {"))
    return client, response, lines


def _rest(response, lines) -> tuple[list[str], str | None]:
    """The remaining data lines of a stream, and how it was cut if it was (never a hang: reads time out)."""
    rest: list[str] = []
    try:
        for line in lines:
            if line.startswith("data:"):
                rest.append(line)
    except httpx.ReadTimeout:
        raise AssertionError("the stream hung") from None
    except httpx.HTTPError as exc:
        return rest, type(exc).__name__
    finally:
        response.close()
    return rest, None


class Backlog:
    """Requests sent straight to one replica (HAProxy does not see them), so that with one KV slot the streams
    sent after them through HAProxy are still running when that replica is signalled: the tiny model would
    otherwise finish any stream within milliseconds."""

    def __init__(self, replica_url: str, n: int = 24) -> None:
        body = {"model": "m", "prompt": "Hi", "max_tokens": LONG, "ignore_eos": True, "temperature": 0}
        self.pool = ThreadPoolExecutor(n)
        self.futures = [self.pool.submit(self._post, replica_url + "/v1/completions", body) for _ in range(n)]

    @staticmethod
    def _post(url: str, body: dict) -> int | str:
        try:
            return httpx.post(url, json=body, timeout=60).status_code
        except httpx.HTTPError as exc:
            return type(exc).__name__

    def results(self) -> list[int | str]:
        out = [f.result(timeout=90) for f in self.futures]
        self.pool.shutdown()
        return out


def _victim(cluster: ClusterProcess, key: str) -> tuple[str, str, int]:
    """The replica a key goes to: its name, URL and pid."""
    wait_until(cluster.idle, 10, "HAProxy idle")
    name = _replica(_chat(cluster.url, {"prompt_cache_key": key, "messages": [{"role": "user", "content": "Hi"}],
                                        "max_tokens": 1}))
    return name, cluster.replica_urls[int(name[1:]) - 1], cluster.replica_pid(name)


def test_sigterm_drains_a_replica_that_then_gets_no_request(cluster: ClusterProcess) -> None:
    up = [name for name, status in cluster.server_status().items() if status == "UP"]
    assert len(up) >= 2
    victim, url, pid = _victim(cluster, "drained-conversation")
    backlog = Backlog(url)
    wait_until(lambda: httpx.get(url + "/v1/stats", timeout=5).json()["queued_requests"] > 0, 10, "a backlog")
    client, response, lines = _open_stream(cluster.url, "drained-conversation")
    try:
        assert _replica(response) == victim
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: cluster.server_status().get(victim) == "DOWN", 10, f"HAProxy taking {victim} out")
        for k in range(12):  # the drained replica's keys go elsewhere meanwhile
            key = "drained-conversation" if k == 0 else f"after-drain-{k}"
            r = _chat(cluster.url, {"prompt_cache_key": key, "messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 1})
            assert r.status_code == 200 and _replica(r) != victim, (r.status_code, r.headers, r.text)
        rest, cut = _rest(response, lines)
    finally:
        client.close()
    assert cut is None and rest[-1] == "data: [DONE]", "the running stream finished during the drain"
    finals = [json.loads(line[6:]) for line in rest[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in finals if c["choices"]][-1] == "length"
    assert backlog.results() == [200] * len(backlog.futures), "every request it held finished"
    exited = wait_until(lambda: [e for e in cluster.events("cluster.replica_exited") if e["replica"] == victim], 30,
                        f"the cluster saying {victim} exited")
    assert exited[0]["code"] == 0
    (drained,) = [e for e in cluster.events("server.draining") if e.get("replica") == victim]
    assert drained["active"] + drained["queued"] > 1, "the stream and the backlog were in flight"


def test_a_killed_replica_cuts_only_its_streams_and_new_requests_are_answered(cluster: ClusterProcess) -> None:
    up = [name for name, status in cluster.server_status().items() if status == "UP"]
    assert len(up) >= 2
    victim, url, pid = _victim(cluster, "killed-0")
    backlog = Backlog(url)
    wait_until(lambda: httpx.get(url + "/v1/stats", timeout=5).json()["queued_requests"] > 0, 10, "a backlog")
    streams = []
    try:
        for k in range(4):  # streams on several replicas: the victim's wait behind its backlog
            streams.append(_open_stream(cluster.url, f"killed-{k}"))
        assert victim in [_replica(response) for _, response, _ in streams]
        os.kill(pid, SIGKILL)
        ends = [(_replica(response), *_rest(response, lines)) for _, response, lines in streams]
    finally:
        for client, *_ in streams:
            client.close()
    for replica, rest, cut in ends:
        if replica == victim:  # cut: the connection closed mid-body, or the stream ended without [DONE]
            assert cut is not None or not rest or rest[-1] != "data: [DONE]", rest[-3:]
        else:
            assert cut is None and rest[-1] == "data: [DONE]", (replica, cut, rest[-3:])
    assert set(backlog.results()) - {200}, "what was left of the backlog died with its replica"
    # At once, before HAProxy's health checks notice: failed connections are retried on another replica.
    for k in range(12):
        r = _chat(cluster.url, {"prompt_cache_key": f"killed-{k % 4}", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 1})
        assert r.status_code == 200 and _replica(r) != victim, (r.status_code, r.text)
    wait_until(lambda: cluster.server_status().get(victim) == "DOWN", 10, f"HAProxy taking {victim} out")
    exited = wait_until(lambda: [e for e in cluster.events("cluster.replica_exited") if e["replica"] == victim], 10,
                        f"the cluster saying {victim} exited")
    assert exited[0]["code"] == -SIGKILL and cluster.proc.poll() is None


def test_rate_limits_count_the_forwarded_client(tiny_hf_dir: Path, tiny_cache, tiny_model_dir: Path,
                                                tiny_server) -> None:
    _haproxy()
    limited = ClusterProcess(tiny_hf_dir, tiny_cache.home, "--replicas", "1", "--rate-limit", "2")
    plain = tiny_server("--rate-limit", "2")  # believes no X-Forwarded-For
    hi = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    try:
        limited.wait_ready()
        # Through HAProxy: one client (127.0.0.1), whatever its session or the X-Forwarded-For it sends
        # (HAProxy replaces it): the third request is refused.
        through = [_chat(limited.url, hi, {"X-Session-Id": f"s{i}", "X-Forwarded-For": f"9.9.9.{i}"}).status_code
                   for i in range(3)]
        assert through == [200, 200, 429]
        # Straight to the replica, which believes X-Forwarded-For from 127.0.0.1: each forwarded address is a
        # client of its own.
        (replica_url,) = limited.replica_urls
        direct = [_chat(replica_url, hi, {"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
        assert direct == [200, 200, 200]
        # A server that believes no proxy counts the real address, whatever X-Forwarded-For says.
        spoofed = [_chat(plain.url, hi, {"X-Forwarded-For": f"9.9.9.{i}"}).status_code for i in range(3)]
        assert spoofed == [200, 200, 429]
    finally:
        plain.stop()
        assert limited.stop() == 0


def test_a_replica_that_cannot_start_is_one_error_line(tiny_hf_dir: Path, tiny_cache, tiny_model_dir: Path) -> None:
    _haproxy()
    failing = ClusterProcess(tiny_hf_dir, tiny_cache.home, "--replicas", "2",
                             env={"OTEL_TRACES_EXPORTER": "carrier-pigeon"})
    assert failing.proc.wait(timeout=120) == 2
    failing.stop()
    errors = [line for line in failing.lines if "error" in line.lower() and "carrier-pigeon" in line]
    assert len(errors) == 1 and errors[0].startswith("streamgen: error: replica r"), failing.output()
    assert "could not start" in errors[0] and "Traceback" not in failing.output()
    assert not failing.events("cluster.ready")


def test_a_busy_port_is_refused_before_any_replica_starts(tmp_path: Path) -> None:
    import socket

    _haproxy()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "streamgen", "cluster", "--port", str(port), "--home",
                                 str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"streamgen: error: cannot listen on 127.0.0.1:{port} (Address already in use); stop what uses that port, "
        "or choose another with --port"]
    assert not (tmp_path / "models").exists()


def test_sigterm_stops_the_replicas_then_haproxy(cluster: ClusterProcess) -> None:
    assert cluster.stop() == 0
    stopped = cluster.events("cluster.stopped")
    assert stopped and cluster.events("cluster.stopping")
    alive = [name for name, code in stopped[0]["replicas"].items() if code != 0]
    killed = [e["replica"] for e in cluster.events("cluster.replica_exited") if e["code"] != 0]
    assert alive == killed, "every replica still running exited cleanly after its drain"
    with pytest.raises(httpx.ConnectError):
        httpx.get(cluster.url + "/health/live", timeout=2)


def test_bench_cluster_reports_every_setup_consistently(tiny_hf_dir: Path, tiny_cache, tiny_model_dir: Path,
                                                        tmp_path: Path) -> None:
    """`streamgen bench cluster` on the tiny model, small: the report's shape and its sums, not its figures."""
    _haproxy()
    out = tmp_path / "cluster.json"
    result = subprocess.run(
        [sys.executable, "-m", "streamgen", "bench", "cluster", "--model", str(tiny_hf_dir), "--home",
         str(tiny_cache.home), "--conversations", "4", "--turns", "2", "--max-tokens", "4", "--concurrency", "2",
         "--rounds", "1", "--system-words", "12", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"workload", "setups", "ratios", "targets", "kill", "runs"}
    assert list(report["setups"]) == ["affinity", "round robin", "one replica"]
    assert [(r["setup"], r["replicas"]) for r in report["runs"]] == [("affinity", 2), ("round robin", 2),
                                                                    ("one replica", 1)]
    for run in report["runs"]:
        assert run["requests"] == 8 and run["failed"] == 0
        assert 0 <= run["cached_tokens"] <= run["prompt_tokens"] and run["completion_tokens"] > 0
        assert run["token_hit_rate"] == round(run["cached_tokens"] / run["prompt_tokens"], 4)
        for share in ("later_turns_cached", "later_turns_history"):
            assert 0 <= run[share] <= 1
        assert run["later_turns_history"] <= run["later_turns_cached"]
        assert run["ttft_p50_ms"] <= run["ttft_p95_ms"] and run["output_tok_s"] > 0
        assert sorted(run["by_replica"]) == [f"r{i + 1}" for i in range(run["replicas"])]
        assert sum(run["by_replica"].values()) == run["requests"]
        setup = report["setups"][run["setup"]]
        assert setup["token_hit_rate"] == run["token_hit_rate"] and setup["requests"] == run["requests"]
    assert set(report["ratios"]) == {"affinity / round robin", "affinity / one replica"}
    kill = report["kill"]
    assert kill["requests"] == 8
    assert kill["failed"] == kill["failed_held"] + kill["failed_dying"] + kill["failed_other"]
    assert kill["teardown_ms"] >= 0
    assert 1 <= kill["killed_after_requests"] <= 8
    assert "| affinity | 2 x" in result.stdout and "Targets:" in result.stdout
