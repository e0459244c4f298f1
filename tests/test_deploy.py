"""The scale-out deployment files, checked without Docker or a cluster (docs/scale-out.md).

- deploy/haproxy/haproxy.cfg runs in a real HAProxy in front of three small fake
  replicas on loopback (plain Python HTTP servers that say which of them answered):
  affinity by key, keyless spreading, X-Forwarded-For, health checks, retries when a
  replica is gone, WebSocket upgrades;
- the compose scale profile's HAProxy configuration (haproxy.cfg + compose-servers.cfg)
  passes `haproxy -c`, and the profile's services agree with it;
- every Kubernetes manifest in deploy/k8s validates against the Kubernetes JSON
  schemas (kubernetes-validate, offline) or, for the InferencePool, against the
  upstream CRD's schema vendored in tests/schemas; broken copies are rejected.
"""

from __future__ import annotations

import base64
import copy
import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from websockets.sync.client import connect as ws_connect
from helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
COMPOSE_SERVERS = ROOT / "deploy" / "haproxy" / "compose-servers.cfg"
K8S = ROOT / "deploy" / "k8s"
INFERENCEPOOL_SCHEMA_DIR = ROOT / "tests" / "schemas"
# The oldest Kubernetes the manifests claim (the preStop sleep action is on by default from 1.30)
# and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
# What the replicas export (docs/scale-out.md); the EPP, HPA and adapter must name these.
QUEUED, ACTIVE, KV_USAGE = "streamgen_requests_queued", "streamgen_requests_active", "streamgen_kv_cache_utilization"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# --- helpers -------------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll until predicate() is truthy; fail with `what` past the deadline (a guard, not a figure)."""
    return wait_until(predicate, timeout, what, interval=0.05)


def _haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)
    if found:
        return found
    message = ("HAProxy is not installed: `make test` installs it (Debian's haproxy, with apt-get), "
               "or run `apt-get install haproxy`")
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def haproxy() -> str:
    return _haproxy_binary()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_frame(stream: io.BufferedIOBase) -> tuple[int, bytes]:
    head = stream.read(2)
    if len(head) < 2:
        return 8, b""
    opcode, size = head[0] & 0x0F, head[1] & 0x7F
    if size == 126:
        size = int.from_bytes(stream.read(2), "big")
    elif size == 127:
        size = int.from_bytes(stream.read(8), "big")
    mask = stream.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = stream.read(size)
    return opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def _frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # HAProxy resets its health-check connections
            super().handle_error(request, client_address)


class Upstream:
    """A fake replica: /health/ready answers 200 or 503 (the test switches it), any POST
    answers which upstream it is and the forwarding headers it saw, and a WebSocket
    upgrade gets an echo that names the upstream."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.healthy = True
        self.hold = threading.Event()  # requests with X-Test-Hold wait for this
        self.in_flight = 0
        self._lock = threading.Lock()
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health/ready":
                    self._reply(200 if upstream.healthy else 503, {"ready": upstream.healthy})
                elif self.headers.get("Upgrade", "").lower() == "websocket":
                    self._websocket()
                else:
                    self._reply(404, {"upstream": upstream.name})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/stream":
                    return self._stream()
                with upstream._lock:
                    upstream.in_flight += 1
                try:
                    if self.headers.get("X-Test-Hold"):
                        upstream.hold.wait(10)
                    self._reply(200, {"upstream": upstream.name, "body_bytes": len(body),
                                      "x_forwarded_for": self.headers.get_all("X-Forwarded-For"),
                                      "x_forwarded_proto": self.headers.get_all("X-Forwarded-Proto")})
                finally:
                    with upstream._lock:
                        upstream.in_flight -= 1

            def _stream(self) -> None:
                """Server-sent events, the second only once the test releases `hold`."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                def send(event: str) -> None:
                    self.wfile.write(f"{len(event):x}\r\n{event}\r\n".encode())
                    self.wfile.flush()

                send(f"data: {upstream.name}\n\n")
                # Released only by a client that got the first event: a buffered stream never is.
                send("data: [DONE]\n\n" if upstream.hold.wait(10) else "data: not released\n\n")
                self.wfile.write(b"0\r\n\r\n")

            def _websocket(self) -> None:
                accept = base64.b64encode(
                    hashlib.sha1((self.headers["Sec-WebSocket-Key"] + WS_GUID).encode()).digest()).decode()
                self.send_response(101)
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                while True:
                    opcode, payload = _read_frame(self.rfile)
                    if opcode == 8:
                        self.wfile.write(_frame(8, payload[:2]))
                        break
                    if opcode == 1:
                        self.wfile.write(_frame(1, f"{upstream.name}:{payload.decode()}".encode()))
                    elif opcode == 9:
                        self.wfile.write(_frame(10, payload))
                    self.wfile.flush()
                self.close_connection = True

        self.server = _QuietServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def kill(self) -> None:
        """Stop serving and close the listening socket: new connections are refused."""
        self.server.shutdown()
        self.server.server_close()


class Balancer:
    """deploy/haproxy/haproxy.cfg with one appended `server` line per upstream, run in the foreground."""

    def __init__(self, binary: str, upstreams: list[Upstream], workdir: Path, check: bool = True,
                 servers: str | None = None) -> None:
        self.upstreams = upstreams
        if servers is None:
            servers = "".join(f"    server {u.name} 127.0.0.1:{u.port}{' check' if check else ''}\n" for u in upstreams)
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(HAPROXY_CFG.read_text().rstrip("\n") + "\n" + servers)
        self.log_path = workdir / "haproxy.log"
        for _attempt in range(3):  # the port is picked free, but another process could take it first
            self.port = _free_port()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env={**os.environ, "STREAMGEN_LB_BIND": f"127.0.0.1:{self.port}"})
            try:
                wait_for(lambda: self.proc.poll() is not None or self._answers(), 10, "HAProxy answers")
            except AssertionError:
                self.stop()
                raise
            if self.proc.poll() is None:
                break
        else:
            raise AssertionError(f"HAProxy did not start:\n{self.log_path.read_text()}")
        if check:
            wait_for(lambda: list(self.status().values()).count("UP") == len(upstreams), 10, "every replica UP")

    def _answers(self) -> bool:
        try:
            return self.get("/haproxy/stats;csv")[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def post(self, body: dict | bytes | None, headers: dict[str, str] | None = None,
             path: str = "/v1/chat/completions") -> dict:
        data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        assert response.status == 200, (response.status, payload[:500], self.log_path.read_text()[-2000:])
        return json.loads(payload)

    def route(self, body: dict | None = None, headers: dict[str, str] | None = None) -> str:
        """The replica a request lands on, sent once HAProxy has nothing in flight: with bounded
        load, a request that overlaps the previous one (HAProxy still closing it) could be sent
        on to the next replica, and these tests ask where a key goes on an idle cluster."""
        wait_for(self.idle, 10, "HAProxy idle")
        return self.post(body, headers)["upstream"]

    def idle(self) -> bool:
        return all(row["scur"] == "0" for row in self.stats() if row["pxname"] == "replicas")

    def stats(self) -> list[dict[str, str]]:
        status, data = self.get("/haproxy/stats;csv")
        assert status == 200
        return list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))

    def status(self) -> dict[str, str]:
        return {row["svname"]: row["status"] for row in self.stats()
                if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")}


@pytest.fixture(scope="module")
def cluster(haproxy: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    upstreams = [Upstream(f"r{i}") for i in (1, 2, 3)]
    balancer = Balancer(haproxy, upstreams, tmp_path_factory.mktemp("haproxy"))
    yield balancer
    balancer.stop()
    for upstream in upstreams:
        upstream.kill()


KEYS = [f"conversation-{i}" for i in range(30)]


def _by_key(cluster: Balancer, keys: list[str] = KEYS) -> dict[str, str]:
    return {key: cluster.route({"prompt_cache_key": key}) for key in keys}


# --- HAProxy: the configuration file -------------------------------------------------------------


def _sections(text: str) -> list[tuple[str, list[str]]]:
    sections: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if not stripped:
            continue
        if not line[0].isspace():
            sections.append((stripped, []))
        else:
            assert sections, f"a directive before any section: {line!r}"
            sections[-1][1].append(stripped)
    return sections


def test_the_config_ends_with_the_one_backend_and_has_no_servers(haproxy: str) -> None:
    sections = _sections(HAPROXY_CFG.read_text())
    assert [name.split()[0] for name, _ in sections] == ["global", "defaults", "frontend", "backend"]
    assert sections[-1][0] == "backend replicas", "server lines are appended: the backend must come last"
    assert not any(d.startswith(("server ", "server-template ")) for _, body in sections for d in body)
    assert "server r1 127.0.0.1:8101 check" in HAPROXY_CFG.read_text(), "the header shows the line to append"
    # Valid on its own (no servers yet), and without any of its environment variables set.
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGEN_LB_")}
    result = subprocess.run([haproxy, "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_environment_variables_and_their_defaults_are_what_the_header_says() -> None:
    text = HAPROXY_CFG.read_text()
    used = dict(re.findall(r'"\$\{(STREAMGEN_LB_[A-Z_]+)-([^}]*)\}"', text))
    assert used == {"STREAMGEN_LB_BIND": ":8000", "STREAMGEN_LB_MAXCONN": "4096", "STREAMGEN_LB_BUFSIZE": "131072"}
    for name, default in used.items():
        assert re.search(rf"#\s+{name}\b.*\(default {re.escape(default)}\)", text), f"{name} undocumented"
    assert ":-" not in text.replace("# ", ""), "HAProxy 2.6 has no ${VAR:-default}, only ${VAR-default}"


# --- HAProxy: behaviour, real HAProxy with fake replicas ------------------------------------------


def test_the_same_prompt_cache_key_always_reaches_the_same_replica_and_keys_spread(cluster: Balancer) -> None:
    first = _by_key(cluster)
    for _ in range(2):
        assert _by_key(cluster) == first
    assert set(first.values()) == {"r1", "r2", "r3"}, first
    # Across endpoints too: the key is in the body, whatever the path.
    key = KEYS[0]
    assert cluster.post({"prompt_cache_key": key}, path="/v1/completions")["upstream"] == first[key]


def test_the_key_is_found_after_a_long_prompt(cluster: Balancer) -> None:
    """The body is read whole (tune.bufsize holds any body a replica accepts, 64 KiB by default),
    so a key that comes after the messages still counts."""
    for key in KEYS[:6]:
        body = {"messages": [{"role": "user", "content": "word " * 12_000}], "prompt_cache_key": key}
        wait_for(cluster.idle, 10, "HAProxy idle")
        answer = cluster.post(body)
        assert answer["body_bytes"] > 60_000
        assert answer["upstream"] == cluster.route({"prompt_cache_key": key})


def _distinct_pair(cluster: Balancer, avoid: str | None = None) -> tuple[str, str]:
    """Two keys that land on different replicas (neither equal to `avoid`)."""
    seen: dict[str, str] = {}
    for i in range(100):
        key = f"pick-{avoid}-{i}"
        where = cluster.route({"prompt_cache_key": key})
        for other, other_where in seen.items():
            if other_where != where:
                return other, key
        seen[key] = where
    raise AssertionError("no two keys on different replicas")


def test_the_key_falls_back_from_prompt_cache_key_to_user_to_session_to_api_key(cluster: Balancer) -> None:
    route_of = lambda key: cluster.route({"prompt_cache_key": key})  # noqa: E731
    # Each source, alone, hashes like the same string given as prompt_cache_key.
    for key in KEYS[:9]:
        expected = route_of(key)
        assert cluster.route({"user": key}) == expected
        assert cluster.route({"prompt_cache_key": "", "user": key}) == expected, "an empty key is no key"
        assert cluster.route({}, {"X-Session-Id": key}) == expected
        assert cluster.route({"user": ""}, {"X-Session-Id": key, "Authorization": ""}) == expected
        assert cluster.route({}, {"Authorization": key}) == expected
        assert cluster.route(b"not json", {"X-Session-Id": key}) == expected, "a body that is not JSON has no key"
    # The order: prompt_cache_key, then user, then X-Session-Id, then Authorization.
    a, b = _distinct_pair(cluster)
    assert cluster.route({"prompt_cache_key": a, "user": b}) == route_of(a)
    assert cluster.route({"user": a}, {"X-Session-Id": b}) == route_of(a)
    assert cluster.route({}, {"X-Session-Id": a, "Authorization": b}) == route_of(a)
    assert cluster.route({"prompt_cache_key": a}, {"X-Session-Id": b, "Authorization": b}) == route_of(a)
    # The whole Authorization header is the key: one API key, one replica.
    token = "Bearer sk-test-0123456789"
    assert {cluster.route({}, {"Authorization": token}) for _ in range(5)} == {route_of(token)}


def test_keyless_requests_reach_every_replica(cluster: Balancer) -> None:
    seen = [cluster.route({"messages": [{"role": "user", "content": "hi"}]}) for _ in range(12)]
    assert set(seen) == {"r1", "r2", "r3"}, seen


def test_one_hot_key_is_spread_when_its_replica_has_too_much_in_flight(cluster: Balancer) -> None:
    """Bounded load: nine requests in flight at once with one key are not all left on its replica."""
    key = KEYS[1]
    home = cluster.route({"prompt_cache_key": key})
    results: list[str] = []

    def send() -> None:
        results.append(cluster.post({"prompt_cache_key": key}, {"X-Test-Hold": "1"})["upstream"])

    threads = [threading.Thread(target=send) for _ in range(9)]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: sum(u.in_flight for u in cluster.upstreams) == 9, 10, "nine requests in flight")
    finally:
        for upstream in cluster.upstreams:
            upstream.hold.set()
        for thread in threads:
            thread.join(15)
        for upstream in cluster.upstreams:
            upstream.hold.clear()
    assert len(results) == 9
    assert home in results and len(set(results)) > 1, results


def test_x_forwarded_for_carries_the_client_address_and_nothing_the_client_made_up(cluster: Balancer) -> None:
    answer = cluster.post({"prompt_cache_key": "xff"})
    assert answer["x_forwarded_for"] == ["127.0.0.1"]
    assert answer["x_forwarded_proto"] == ["http"]
    spoofed = cluster.post({"prompt_cache_key": "xff"}, {"X-Forwarded-For": "203.0.113.9",
                                                          "X-Forwarded-Proto": "https"})
    assert spoofed["x_forwarded_for"] == ["127.0.0.1"], "a client cannot choose the address the replica sees"
    assert spoofed["x_forwarded_proto"] == ["http"]


def test_a_replica_that_turns_not_ready_loses_its_keys_and_gets_them_back(cluster: Balancer) -> None:
    before = _by_key(cluster)
    victim = cluster.upstreams[0]
    its_keys = [k for k, where in before.items() if where == victim.name]
    assert its_keys, before
    victim.healthy = False
    try:
        wait_for(lambda: cluster.status()[victim.name].startswith("DOWN"), 10, f"{victim.name} marked DOWN")
        during = _by_key(cluster)
        assert victim.name not in during.values()
        # Consistent hashing: only the keys of the replica that left move.
        assert {k: w for k, w in during.items() if before[k] != victim.name} == \
               {k: w for k, w in before.items() if w != victim.name}
    finally:
        victim.healthy = True
    wait_for(lambda: cluster.status()[victim.name] == "UP", 10, f"{victim.name} back UP")
    assert _by_key(cluster) == before


def test_requests_for_a_replica_that_is_gone_are_retried_on_another(haproxy: str, tmp_path: Path) -> None:
    """No health checks here, so only retry-on conn-failure with redispatch can answer them."""
    upstreams = [Upstream(f"r{i}") for i in (1, 2, 3)]
    balancer = Balancer(haproxy, upstreams, tmp_path, check=False)
    try:
        before = _by_key(balancer)
        victim = upstreams[1]
        victim.kill()
        after = _by_key(balancer)
        assert victim.name not in after.values()
        assert {k: w for k, w in after.items() if before[k] != victim.name} == \
               {k: w for k, w in before.items() if w != victim.name}
        backend = next(r for r in balancer.stats() if r["pxname"] == "replicas" and r["svname"] == "BACKEND")
        assert int(backend["wredis"]) >= sum(1 for w in before.values() if w == victim.name)
    finally:
        balancer.stop()
        for upstream in upstreams:
            if upstream is not upstreams[1]:
                upstream.kill()


def test_streamed_events_reach_the_client_as_they_are_sent(cluster: Balancer) -> None:
    """The first event arrives while the replica still holds back the second: nothing buffers the stream."""
    conn = http.client.HTTPConnection("127.0.0.1", cluster.port, timeout=10)
    try:
        conn.request("POST", "/v1/stream", body=b'{"stream": true}', headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "text/event-stream"
        first = response.readline()
        assert first.startswith(b"data: r"), first
        for upstream in cluster.upstreams:
            upstream.hold.set()
        assert response.read().strip().endswith(b"data: [DONE]")
    finally:
        conn.close()
        for upstream in cluster.upstreams:
            upstream.hold.clear()


def test_websocket_upgrades_pass_through_with_the_session_affinity(cluster: Balancer) -> None:
    for key in KEYS[:3]:
        expected = cluster.route({"prompt_cache_key": key})
        with ws_connect(f"ws://127.0.0.1:{cluster.port}/v1/ws", additional_headers={"X-Session-Id": key},
                        open_timeout=10, close_timeout=5) as ws:
            for message in ("hello", "again"):
                ws.send(message)
                assert ws.recv(timeout=10) == f"{expected}:{message}"


def test_haproxy_serves_its_own_pages_and_forwards_metrics(cluster: Balancer) -> None:
    status, page = cluster.get("/haproxy/stats")
    assert status == 200 and b"replicas" in page
    status, metrics = cluster.get("/haproxy/metrics")
    assert status == 200 and b"haproxy_backend_active_servers" in metrics
    status, body = cluster.get("/metrics")
    assert status == 404 and json.loads(body)["upstream"] in {"r1", "r2", "r3"}, "/metrics is the replicas'"


# --- compose: the scale profile -----------------------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """Compose's YAML: accepts its !reset and !override tags (as tests/test_compose.py)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.load((ROOT / "compose.yaml").read_text(), Loader=_ComposeLoader)


def _template() -> re.Match:
    match = re.search(r"^\s+server-template (\S+) 1-(\d+) ([\w.-]+):(\d+) (.*)$", COMPOSE_SERVERS.read_text(), re.M)
    assert match, "compose-servers.cfg has one server-template line"
    return match


def _mounts(service: dict) -> dict[str, Path]:
    """Container path -> file on this machine, for the service's bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def test_the_scale_profile_puts_replicas_behind_haproxy(compose: dict) -> None:
    services = compose["services"]
    scale = {name for name, s in services.items() if "scale" in s.get("profiles", [])}
    assert scale == {"streamgen-replica", "haproxy"}
    assert "profiles" not in services["streamgen"], "the default stack is unchanged"
    replica, balancer = services["streamgen-replica"], services["haproxy"]
    _, count, host, port, options = _template().groups()
    assert host == "streamgen-replica" and int(count) == replica["deploy"]["replicas"] >= 2
    assert port == "8000" and "STREAMGEN_PORT=8000" in (ROOT / "Dockerfile").read_text().replace(" ", "")
    assert options.split()[:3] == ["check", "resolvers", "docker"]
    assert replica["image"] == services["streamgen"]["image"] and "ports" not in replica
    assert replica["depends_on"]["streamgen"]["condition"] == "service_healthy", "one pull, by streamgen"
    assert "models:/models" in replica["volumes"]
    env = {k: str(v) for k, v in replica["environment"].items()}
    assert env["STREAMGEN_FORWARDED_ALLOW_IPS"] and env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    grace = int(re.fullmatch(r"(\d+)s", replica["stop_grace_period"]).group(1))
    assert grace > int(env["STREAMGEN_SHUTDOWN_GRACE"]), "Docker must not kill a replica mid-drain"

    assert balancer["image"].startswith("haproxy:2.6")
    command = balancer["entrypoint"][-1]
    concatenated = re.fullmatch(r"cat (\S+) (\S+) > (\S+)\s+&& exec haproxy -db -f (\S+)", command)
    assert concatenated and concatenated[3] == concatenated[4], command
    mounts = _mounts(balancer)
    assert [mounts[concatenated[1]], mounts[concatenated[2]]] == [HAPROXY_CFG, COMPOSE_SERVERS]
    bind_port = balancer["environment"]["STREAMGEN_LB_BIND"].rsplit(":", 1)[1]
    assert [str(p).split(":")[1] for p in balancer["ports"]] == [bind_port]


def test_the_compose_haproxy_configuration_parses(haproxy: str, compose: dict, tmp_path: Path) -> None:
    """What the haproxy service's entrypoint makes, checked by `haproxy -c` with its environment."""
    config = tmp_path / "haproxy.cfg"
    config.write_bytes(HAPROXY_CFG.read_bytes() + COMPOSE_SERVERS.read_bytes())
    env = {**os.environ, **{k: str(v) for k, v in compose["services"]["haproxy"]["environment"].items()}}
    result = subprocess.run([haproxy, "-c", "-f", str(config)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resolvers docker" in COMPOSE_SERVERS.read_text() and "127.0.0.11:53" in COMPOSE_SERVERS.read_text()


class FakeDNS:
    """Docker's DNS, reduced to one name: A queries for it get the given addresses."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name, self.addresses = name, addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            labels, i = [], 12
            while query[i]:
                labels.append(query[i + 1:i + 1 + query[i]].decode())
                i += 1 + query[i]
            qtype = int.from_bytes(query[i + 1:i + 3], "big")
            question = query[12:i + 5]
            known = ".".join(labels).lower() == self.name
            answers = [b"\xc0\x0c" + (1).to_bytes(2, "big") + (1).to_bytes(2, "big") + (5).to_bytes(4, "big")
                       + (4).to_bytes(2, "big") + socket.inet_aton(a) for a in self.addresses] \
                if known and qtype == 1 else []
            flags = 0x8180 if known else 0x8183  # NOERROR, or NXDOMAIN
            header = query[:2] + flags.to_bytes(2, "big") + (1).to_bytes(2, "big") \
                + len(answers).to_bytes(2, "big") + bytes(4)
            self.sock.sendto(header + question + b"".join(answers), peer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_the_compose_servers_find_the_replicas_through_dns(haproxy: str, tmp_path: Path) -> None:
    """compose-servers.cfg as compose runs it, with a fake DNS in place of Docker's (its address and
    the replicas' port changed to free ones on loopback): the slots fill with the three replicas."""
    port = _free_port()
    addresses = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]
    upstreams: list[Upstream] = []
    try:
        for i, address in enumerate(addresses, 1):
            upstreams.append(Upstream(f"u{i}", address, port))
    except OSError as error:  # a server of someone else's holds the port on every address
        for upstream in upstreams:
            upstream.kill()
        pytest.skip(f"loopback port {port} is taken: {error}")
    dns = FakeDNS("streamgen-replica", addresses)
    servers = COMPOSE_SERVERS.read_text().replace("127.0.0.11:53", f"127.0.0.1:{dns.port}") \
        .replace("streamgen-replica:8000", f"streamgen-replica:{port}")
    balancer = None
    try:
        balancer = Balancer(haproxy, upstreams, tmp_path, servers=servers)
        assert set(balancer.status()) == {"replica1", "replica2", "replica3"}
        seen = {balancer.route({}) for _ in range(9)}
        assert seen == {"u1", "u2", "u3"}
        key = KEYS[0]
        assert len({balancer.route({"prompt_cache_key": key}) for _ in range(5)}) == 1
    finally:
        if balancer:
            balancer.stop()
        dns.stop()
        for upstream in upstreams:
            upstream.kill()


# --- Kubernetes: deploy/k8s against the schemas, offline ------------------------------------------


def _manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.rglob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                found.append((f"{path.relative_to(K8S)}#{i}", doc))
    return found


MANIFESTS = _manifests()
CRD_SCHEMAS = {("inference.networking.k8s.io/v1", "InferencePool"):
               sorted(INFERENCEPOOL_SCHEMA_DIR.glob("inferencepool-v*.json"))}


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused: the API server would prune them silently, so a
    misspelt field would vanish from the object instead of failing here."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        strict["additionalProperties"] = False
    return strict


def _cel_rules(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        rules = {r["rule"] for r in schema.get("x-kubernetes-validations", [])}
        return rules.union(*(_cel_rules(v) for v in schema.values()))
    if isinstance(schema, list):
        return set().union(*(_cel_rules(v) for v in schema))
    return set()


# The CRD's CEL rules (x-kubernetes-validations), which jsonschema does not run, checked by hand.
INFERENCEPOOL_CEL = {
    "self.kind != 'Service' || has(self.port)":
        lambda spec: spec.get("endpointPickerRef") is None or spec["endpointPickerRef"].get("kind", "Service")
        != "Service" or "port" in spec["endpointPickerRef"],
    "self.all(p1, self.exists_one(p2, p1.number==p2.number))":
        lambda spec: len({p["number"] for p in spec["targetPorts"]}) == len(spec["targetPorts"]),
}


def validate(doc: dict) -> None:
    """Raises (jsonschema.ValidationError, or ValueError for a CEL rule) if the manifest is invalid."""
    schemas = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if schemas is None:
        for version in K8S_VERSIONS:  # an unknown kind raises SchemaNotFoundError: every manifest is checked
            kubernetes_validate.validate(doc, version, strict=True)
        return
    assert schemas, "no vendored schema for the InferencePool"
    for path in schemas:
        schema = json.loads(path.read_text())
        assert set(INFERENCEPOOL_CEL) == _cel_rules(schema), f"{path.name}: the CEL rules changed"
        jsonschema.validate(doc, _strict(schema), cls=jsonschema.Draft7Validator)
        for rule, holds in INFERENCEPOOL_CEL.items():
            if not holds(doc["spec"]):
                raise ValueError(f"{path.name}: {rule}")
    # The CRD leaves metadata as any object; check it as the ObjectMeta it is.
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                 K8S_VERSIONS[-1], strict=True)


def _one(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in MANIFESTS if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.parametrize("doc", [d for _, d in MANIFESTS], ids=[i for i, _ in MANIFESTS])
def test_every_manifest_validates(doc: dict) -> None:
    validate(doc)


def test_the_manifests_are_all_there() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in MANIFESTS}
    assert {("Deployment", "streamgen"), ("PersistentVolumeClaim", "streamgen-models"), ("Service", "streamgen"),
            ("PodDisruptionBudget", "streamgen"), ("HorizontalPodAutoscaler", "streamgen"),
            ("ConfigMap", "prometheus-adapter"), ("InferencePool", "streamgen"), ("Deployment", "streamgen-epp"),
            ("Service", "streamgen-epp")} <= kinds


def _set(doc: dict, path: str, value: Any) -> dict:
    """A copy of doc with the value at a dotted path (list indices as numbers) replaced, or removed
    when value is _DELETE."""
    broken = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = broken
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return broken


_DELETE = object()
BROKEN = [
    ("Deployment", "streamgen", "spec.replicas", "two"),
    ("Deployment", "streamgen", "spec.template.spec.containerz", []),
    ("Deployment", "streamgen", "spec.template.spec.containers.0.readinessProbe.httpGet.paht", "/health/ready"),
    ("Deployment", "streamgen", "spec.template.spec.containers.0.lifecycle.preStop.sleep.seconds", "5s"),
    ("Deployment", "streamgen", "spec.selector", _DELETE),
    ("Service", "streamgen", "spec.ports.0.port", "http"),
    ("PodDisruptionBudget", "streamgen", "spec.maxUnavailable", [1]),
    ("HorizontalPodAutoscaler", "streamgen", "spec.metrics.0.pods.target.type", _DELETE),
    ("HorizontalPodAutoscaler", "streamgen", "spec.metrics.0.pods.metric.name", 7),
    ("PersistentVolumeClaim", "streamgen-models", "spec.accessModes", "ReadWriteMany"),
    ("InferencePool", "streamgen", "spec.targetPorts", _DELETE),
    ("InferencePool", "streamgen", "spec.targetPorts.0.number", 70000),
    ("InferencePool", "streamgen", "spec.targetPortNumber", 8000),  # the v1alpha2 field
    ("InferencePool", "streamgen", "spec.targetPorts", [{"number": 8000}, {"number": 8000}]),  # CEL
    ("InferencePool", "streamgen", "spec.endpointPickerRef.port", _DELETE),  # CEL
    ("InferencePool", "streamgen", "spec.selector.matchLabels", {}),
    ("InferencePool", "streamgen", "metadata.labelz", {}),
]


@pytest.mark.parametrize(("kind", "name", "path", "value"), BROKEN, ids=[f"{k}:{p}" for k, _, p, _ in BROKEN])
def test_a_broken_manifest_is_rejected(kind: str, name: str, path: str, value: Any) -> None:
    """The validation can fail: each of these copies, broken in one place, is refused."""
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate(_set(_one(kind, name), path, value))


def _env(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_the_deployment_serves_drains_and_keeps_its_models() -> None:
    deployment = _one("Deployment", "streamgen")
    pod = deployment["spec"]["template"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod["metadata"]["labels"])
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "streamgen:latest"
    # The image has no ENTRYPOINT (its CMD is `streamgen serve`): args alone would replace the command.
    assert container["command"] + container["args"] == ["streamgen", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    env = _env(container)
    assert env["STREAMGEN_HOME"] == "/models"
    assert env["STREAMGEN_REPLICA_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["STREAMGEN_FORWARDED_ALLOW_IPS"]
    for probe, path in (("startupProbe", "/health/ready"), ("readinessProbe", "/health/ready"),
                        ("livenessProbe", "/health/live")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "minutes to load and warm up"
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 3
    assert pod["spec"]["terminationGracePeriodSeconds"] > pre_stop + int(env["STREAMGEN_SHUTDOWN_GRACE"])
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # The model cache: a claim that storage.yaml makes, mounted where STREAMGEN_HOME points.
    (volume,) = pod["spec"]["volumes"]
    _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    for c in pod["spec"]["containers"] + pod["spec"]["initContainers"]:
        assert {"name": volume["name"], "mountPath": "/models"} in c["volumeMounts"]
        assert _env(c)["STREAMGEN_HOME"] == "/models"
    (pull,) = pod["spec"]["initContainers"]
    assert pull["command"][:2] == ["flock", "/models/.streamgen-pull.lock"] and pull["command"][2:4] == \
        ["streamgen", "pull"], "one replica pulls at a time"


def test_the_service_pdb_and_autoscaler_point_at_the_replicas() -> None:
    deployment = _one("Deployment", "streamgen")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    service = _one("Service", "streamgen")
    assert _matches(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http", 8000) and ports[port["targetPort"]] == 8000
    pdb = _one("PodDisruptionBudget", "streamgen")
    assert _matches(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    hpa = _one("HorizontalPodAutoscaler", "streamgen")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "streamgen"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == QUEUED
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_the_adapter_rule_serves_the_queue_metric_per_pod() -> None:
    config = yaml.safe_load(_one("ConfigMap", "prometheus-adapter")["data"]["config.yaml"])
    (rule,) = config["rules"]
    assert rule["seriesQuery"].startswith(QUEUED + "{")
    assert rule["name"]["as"] == QUEUED and re.fullmatch(rule["name"]["matches"], QUEUED)
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"] and "by (<<.GroupBy>>)" in rule["metricsQuery"]


def test_the_inference_pool_selects_the_replicas_and_its_picker_reads_streamgen_metrics() -> None:
    deployment = _one("Deployment", "streamgen")
    pool = _one("InferencePool", "streamgen")
    assert _matches(pool["spec"]["selector"]["matchLabels"], deployment["spec"]["template"]["metadata"]["labels"])
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [8000]

    ref = pool["spec"]["endpointPickerRef"]
    epp_service = _one("Service", ref["name"])
    epp = _one("Deployment", ref["name"])
    assert _matches(epp_service["spec"]["selector"], epp["spec"]["template"]["metadata"]["labels"])
    (container,) = epp["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (grpc,) = [p for p in epp_service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert ports[grpc["targetPort"]] == ref["port"]["number"]

    image, tag = container["image"].rsplit(":", 1)
    assert image == "registry.k8s.io/gateway-api-inference-extension/epp" and tag == "v1.3.1", \
        "the metric flags exist up to v1.3 (refused from v1.4)"
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    assert args["total-queued-requests-metric"] == QUEUED
    assert args["total-running-requests-metric"] == ACTIVE
    assert args["kv-cache-usage-percentage-metric"] == KV_USAGE
    assert args["pool-name"] == pool["metadata"]["name"]
    assert args["pool-namespace"] == "$(NAMESPACE)" and "NAMESPACE" in _env(container)
    # The plugins file is a key of the mounted ConfigMap, and its profile uses only defined plugins.
    (mount,) = container["volumeMounts"]
    (volume,) = [v for v in epp["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    directory, filename = args["config-file"].rsplit("/", 1)
    assert directory == mount["mountPath"]
    plugins = yaml.safe_load(_one("ConfigMap", volume["configMap"]["name"])["data"][filename])
    defined = {p["type"] for p in plugins["plugins"]}
    used = {p["pluginRef"] for profile in plugins["schedulingProfiles"] for p in profile["plugins"]}
    assert used == defined == {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"}
    role = _one("Role", epp["spec"]["template"]["spec"]["serviceAccountName"])
    assert any("inferencepools" in r["resources"] and "inference.networking.k8s.io" in r["apiGroups"]
               for r in role["rules"])
