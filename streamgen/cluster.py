"""`streamgen cluster`: several `streamgen serve` replicas on one machine, behind HAProxy.

For trying a scale-out deployment on one machine, testing it, and the
`streamgen bench cluster` benchmark (docs/scale-out.md). Each replica is a
`streamgen serve` process on a free loopback port, named r1..rN
(`--replica-id`), trusting X-Forwarded-For from loopback only
(`--forwarded-allow-ips 127.0.0.1`), with the cores split between them. HAProxy
runs deploy/haproxy/haproxy.cfg with one `server` line per replica appended:
HAProxy does all the balancing, health checking and retrying; this module only
starts, watches and stops processes.

- Start: the replicas all at once; each must answer /health/ready before
  HAProxy starts. A replica that exits or never gets ready stops the others and
  ends in one error that carries its own error line.
- Run: replicas' log lines pass through to stderr as they are (each carries
  `replica=`); HAProxy's own notices are logged here, its request log at debug
  level. A replica or HAProxy that exits unexpectedly is said in one log line;
  HAProxy takes a dead replica out, and the others go on serving.
- Stop (SIGTERM or SIGINT): SIGTERM to every replica, which drains (finishes
  what runs within its --shutdown-grace), then HAProxy is stopped. A second
  signal ends the replicas' drains at once.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog

from streamgen.config import flag_name
from streamgen.errors import ConfigError, StreamgenError

log = structlog.get_logger("streamgen.cluster")

CONFIG_NAME = "haproxy.cfg"
# Where a non-editable install puts the configuration ([tool.setuptools.data-files] in pyproject.toml).
DATA_DIR = Path("share") / "streamgen" / "haproxy"
# The checkout's copy, for editable and source installs (and running from the tree).
CHECKOUT_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / CONFIG_NAME
LOOPBACK = "127.0.0.1"
# What the cluster sets on every replica itself; `streamgen cluster` takes every other setting of serve and
# passes it through.
SET_BY_CLUSTER = ("port", "host", "threads", "replica_id", "forwarded_allow_ips")
_BALANCE = re.compile(r"^(\s*)balance\s+\S.*$", re.MULTILINE)
_HEALTH_CHECK = re.compile(r'uvicorn\.access.*"GET /health/(ready|live) HTTP|"GET /health/(ready|live) HTTP.*uvicorn\.access')
_SERVER_NOTICE = re.compile(r"^Server replicas/(\S+) is (?:DOWN|UP)")
_STOP_GRACE_MARGIN_S = 15.0  # beyond a replica's --shutdown-grace before it is killed


class ClusterError(StreamgenError):
    """The cluster could not start (a replica or HAProxy failed); the message says which and why."""


def haproxy_binary() -> str:
    """HAProxy's path, or one error that says how to install it."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)
    if found is None:
        raise ConfigError("HAProxy is not installed: streamgen cluster runs it in front of the replicas; install "
                          "it with `apt-get install haproxy` (Debian, Ubuntu) or your system's package manager")
    return found


def config_candidates() -> list[Path]:
    """Where the HAProxy configuration is looked for, in order: the checkout (editable and source installs),
    then the data files of a non-editable install (this environment's prefix, then the user's base)."""
    prefixes = [Path(sys.prefix)]
    if site.USER_BASE:
        prefixes.append(Path(site.USER_BASE))
    return [CHECKOUT_CONFIG, *(prefix / DATA_DIR / CONFIG_NAME for prefix in prefixes)]


def find_config(explicit: str | os.PathLike | None = None) -> Path:
    """--haproxy-config when given (it must exist), else the first of config_candidates() that exists."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"--haproxy-config {explicit}: no such file")
        return path
    for path in config_candidates():
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in config_candidates())
    raise ConfigError(f"found no HAProxy configuration (looked for {looked}); give the checkout's "
                      "deploy/haproxy/haproxy.cfg with --haproxy-config PATH")


def render_config(base: str, servers: Iterable[tuple[str, str, int]], balance: str | None = None) -> str:
    """The configuration with one `server NAME HOST:PORT check` line per replica appended (the file ends with
    the backend they belong to). balance: replace the backend's balance algorithm (bench cluster's round-robin
    baseline uses "roundrobin"); everything else stays as shipped."""
    if balance is not None:
        if len(_BALANCE.findall(base)) != 1:
            raise ValueError("the HAProxy configuration should have exactly one balance line")
        base = _BALANCE.sub(lambda m: f"{m.group(1)}balance {balance}", base)
    lines = "".join(f"    server {name} {host}:{port} check\n" for name, host, port in servers)
    return base.rstrip("\n") + "\n" + lines


def replica_threads(replicas: int, cores: int | None = None) -> int:
    """ONNX Runtime threads for each replica: the cores split between them, at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // replicas)


def serve_flags(values: Mapping[str, Any]) -> list[str]:
    """`streamgen serve` flags for these settings (name -> value, as parsed): what a cluster passes on."""
    flags: list[str] = []
    for name, value in values.items():
        if name in SET_BY_CLUSTER:
            raise ValueError(f"the cluster sets {flag_name(name)} on its replicas itself")
        if isinstance(value, bool):
            flags.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        else:
            flags += [flag_name(name), str(value)]
    return flags


def free_port(host: str = LOOPBACK) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect_host(host: str) -> str:
    """Where to reach a listener bound to host from this machine."""
    if host in ("0.0.0.0", ""):
        return LOOPBACK
    if host == "::":
        return "::1"
    return host


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the cluster process dies (Linux), so a killed cluster leaves
    no replica or HAProxy behind."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()


def _interrupt(sig: int, frame) -> None:
    raise KeyboardInterrupt


def _get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback URLs we made
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


@dataclass(eq=False)
class _Child:
    """A process the cluster started, its output read line by line in a thread."""

    name: str
    proc: subprocess.Popen
    expected_exit: bool = False  # the cluster stopped it (not a crash)
    reported: bool = False  # its unexpected exit was logged
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    error_line: str | None = None  # its `streamgen: error:` line, if it printed one
    readers: list[threading.Thread] = field(default_factory=list)  # the threads reading its output

    def alive(self) -> bool:
        return self.proc.poll() is None


@dataclass(eq=False)
class Replica(_Child):
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


class Cluster:
    """N `streamgen serve` replicas behind HAProxy, as processes of this one.

    serve_flags: the replicas' settings (the model, limits, log format...); the cluster adds --host, --port,
    --replica-id, --forwarded-allow-ips, --threads and --no-pull. output: where the replicas' own log lines go
    (None: nowhere)."""

    def __init__(self, replicas: int, serve_flags: Sequence[str], *, port: int = 8000, host: str = LOOPBACK,
                 threads: int | None = None, config: Path | None = None, haproxy: str | None = None,
                 balance: str | None = None, shutdown_grace: float = 15.0, ready_timeout: float = 600.0,
                 output: IO[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        if replicas < 1:
            raise ConfigError(f"--replicas must be at least 1, got {replicas}")
        self.count = replicas
        self.serve_flags = list(serve_flags)
        self.host = host
        self.port = port or free_port(_connect_host(host))
        self.threads = threads if threads is not None else replica_threads(replicas)
        self.haproxy_path = haproxy or haproxy_binary()
        self.config_path = config or find_config()
        self.balance = balance
        self.shutdown_grace = shutdown_grace
        self.ready_timeout = ready_timeout
        self.output = output
        self.env = {**os.environ, **(env or {})}
        self.replicas: list[Replica] = []
        self.haproxy: _Child | None = None
        self._workdir: Path | None = None
        self._write_lock = threading.Lock()
        self._stopping = threading.Event()
        self._signals = 0

    # --- what callers read -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return _url(self.host, self.port)

    @property
    def local_url(self) -> str:
        """The balancer's URL from this machine (a wildcard bind is reached on loopback)."""
        return _url(_connect_host(self.host), self.port)

    def replica(self, name: str) -> Replica:
        return next(r for r in self.replicas if r.name == name)

    def server_status(self) -> dict[str, str]:
        """HAProxy's view of each replica (UP, DOWN, ...), from its stats page."""
        status, data = _get(self.local_url + "/haproxy/stats;csv", timeout=2)
        if status != 200:
            return {}
        rows = csv.DictReader(io.StringIO(data.decode().lstrip("# ")))
        return {row["svname"]: row["status"] for row in rows
                if row["pxname"] == "replicas" and row["svname"] not in ("BACKEND", "FRONTEND")}

    # --- life cycle ------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the replicas, wait until each is ready, then start HAProxy in front and wait until it sees
        them all up. On failure everything started is stopped and ClusterError says what failed."""
        try:
            self._start_replicas()
            self._wait_replicas_ready()
            self._start_haproxy()
        except BaseException:
            self.stop(quiet=True)
            raise
        log.info("cluster.ready", url=self.url, replicas=",".join(r.url for r in self.replicas))

    def _start_replicas(self) -> None:
        for i in range(1, self.count + 1):
            port = free_port()
            cmd = [sys.executable, "-m", "streamgen", "serve", *self.serve_flags, "--no-pull", "--host", LOOPBACK,
                   "--port", str(port), "--replica-id", f"r{i}", "--forwarded-allow-ips", LOOPBACK,
                   "--threads", str(self.threads)]
            self.replicas.append(Replica(f"r{i}", self._spawn(cmd), port=port))
        for replica in self.replicas:
            self._relay(replica, replica.proc.stdout, self._replica_line)

    def _spawn(self, cmd: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        # Its own process group: a Ctrl-C on the terminal reaches the cluster only, which then drains the
        # replicas with one SIGTERM each (a second signal would end their drain at once).
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, env=env or self.env, process_group=0,
                                preexec_fn=_die_with_parent if _LIBC is not None else None)

    def _relay(self, child: _Child, stream: IO[str], handle) -> threading.Thread:
        def pump() -> None:
            for line in stream:
                handle(child, line.rstrip("\n"))
            stream.close()

        thread = threading.Thread(target=pump, name=f"cluster-{child.name}", daemon=True)
        thread.start()
        child.readers.append(thread)
        return thread

    def _replica_line(self, replica: _Child, line: str) -> None:
        replica.tail.append(line)
        if line.startswith("streamgen: error: "):
            replica.error_line = line[len("streamgen: error: "):]
            return  # said once, by the cluster
        if _HEALTH_CHECK.search(line):
            return  # uvicorn's access line for each of HAProxy's health checks: two a second per replica
        if self.output is not None:
            with self._write_lock:
                self.output.write(line + "\n")
                self.output.flush()

    def _wait_replicas_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        pending = list(self.replicas)
        while pending:
            for replica in list(pending):
                if not replica.alive():
                    raise ClusterError(self._failure(replica))
                try:
                    if _get(replica.url + "/health/ready")[0] == 200:
                        pending.remove(replica)
                        log.debug("cluster.replica_ready", replica=replica.name, url=replica.url)
                except OSError:
                    pass
            if pending and time.monotonic() > deadline:
                names = ", ".join(r.name for r in pending)
                raise ClusterError(f"replica {names} was not ready after {self.ready_timeout:.0f} s; the others were "
                                   "stopped")
            if pending:
                time.sleep(0.2)

    def _failure(self, replica: Replica) -> str:
        replica.proc.wait()
        for reader in replica.readers:  # its last lines
            reader.join(timeout=2)
        reason = replica.error_line or next((line for line in reversed(replica.tail) if line.strip()),
                                            f"exit status {replica.proc.returncode}")
        return f"replica {replica.name} could not start: {reason}" + (
            "; the others were stopped" if self.count > 1 else "")

    def _start_haproxy(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="streamgen-cluster-"))
        config = self._workdir / CONFIG_NAME
        servers = [(r.name, LOOPBACK, r.port) for r in self.replicas]
        config.write_text(render_config(self.config_path.read_text(), servers, self.balance))
        env = {**self.env, "STREAMGEN_LB_BIND": _bind_address(self.host, self.port)}
        proc = subprocess.Popen([self.haproxy_path, "-db", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                                bufsize=1, env=env, process_group=0,
                                preexec_fn=_die_with_parent if _LIBC is not None else None)
        self.haproxy = _Child("haproxy", proc)
        self._relay(self.haproxy, proc.stderr, self._haproxy_notice)
        self._relay(self.haproxy, proc.stdout, self._haproxy_log)
        deadline = time.monotonic() + 15
        while True:
            if not self.haproxy.alive():
                proc.wait()
                for reader in self.haproxy.readers:
                    reader.join(timeout=2)
                alerts = [line for line in self.haproxy.tail if "[ALERT]" in line] or list(self.haproxy.tail)[-1:]
                reason = alerts[0].split(":", 1)[-1].strip() if alerts else f"exit status {proc.returncode}"
                raise ClusterError(f"HAProxy could not start on {self.host}:{self.port}: {reason}")
            try:
                if sorted(self.server_status().values()) == ["UP"] * self.count:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"HAProxy on {self.host}:{self.port} did not see every replica up within 15 s "
                                   f"({self.server_status() or 'its stats page did not answer'})")
            time.sleep(0.1)

    def _haproxy_notice(self, child: _Child, line: str) -> None:
        """HAProxy's stderr: its alerts, warnings and notices (a replica going down or up among them)."""
        child.tail.append(line)
        if not line.strip():
            return
        message = re.sub(r"^\[(\w+)\]\s*\(\d+\)\s*:\s*", "", line)
        level = {"[ALERT]": "error", "[WARNING]": "warning"}.get(line.split(" ", 1)[0], "info")
        server = _SERVER_NOTICE.search(message)
        if self._stopping.is_set():
            level = "debug"  # the replicas going down because the cluster stops them
        elif server and any(r.name == server.group(1) and not r.alive() for r in self.replicas):
            level = "debug"  # an exited replica: cluster.replica_exited said it once
        getattr(log, level)("haproxy." + ("alert" if level == "error" else "notice"), message=message)

    def _haproxy_log(self, child: _Child, line: str) -> None:
        """HAProxy's log (one line per request, and the notices again): at debug level only."""
        if line.strip():
            log.debug("haproxy.log", line=line)

    def run(self) -> int:
        """start(), then watch() until a signal: `streamgen cluster`. A SIGTERM while starting stops what was
        started (as Ctrl-C does)."""
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self.start()
        finally:
            signal.signal(signal.SIGTERM, previous)
        return self.watch()

    def watch(self) -> int:
        """Until SIGTERM or SIGINT: say so when a replica or HAProxy exits unexpectedly; then stop everything.
        0 after a signal; 1 when HAProxy died (nothing reaches the replicas then)."""
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        code = 0
        try:
            while not self._stopping.wait(0.2):
                for replica in self.replicas:
                    if not replica.alive() and not replica.expected_exit and not replica.reported:
                        replica.reported = True
                        log.error("cluster.replica_exited", replica=replica.name, url=replica.url,
                                  code=replica.proc.returncode, running=sum(r.alive() for r in self.replicas),
                                  note="HAProxy takes it out; the others keep serving")
                if self.haproxy is not None and not self.haproxy.alive():
                    log.error("cluster.haproxy_exited", code=self.haproxy.proc.returncode,
                              note="nothing reaches the replicas: stopping them")
                    code = 1
                    break
        finally:
            self.stop()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        return code

    def _on_signal(self, sig: int, frame) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("cluster.stopping", signal=signal.Signals(sig).name, replicas=len(self.replicas))
            self._stopping.set()
        else:  # a second signal: the replicas stop at once (their own second signal)
            for replica in self.replicas:
                if replica.alive():
                    replica.proc.send_signal(signal.SIGTERM)

    def kill_replica(self, name: str, sig: int = signal.SIGKILL) -> Replica:
        """Send a replica a signal as an outside event would (tests and bench cluster): its exit is unexpected."""
        replica = self.replica(name)
        replica.proc.send_signal(sig)
        return replica

    def stop(self, quiet: bool = False) -> None:
        """SIGTERM every replica (each drains), wait for them, then stop HAProxy. Idempotent."""
        self._stopping.set()
        for replica in self.replicas:
            replica.expected_exit = True
            if replica.alive():
                replica.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace + _STOP_GRACE_MARGIN_S
        for replica in self.replicas:
            try:
                replica.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("cluster.replica_killed", replica=replica.name, note="it did not exit after its drain")
                replica.proc.kill()
                replica.proc.wait()
        if self.haproxy is not None:
            self.haproxy.expected_exit = True
            if self.haproxy.alive():
                self.haproxy.proc.terminate()
            try:
                self.haproxy.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.haproxy.proc.kill()
                self.haproxy.proc.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if not quiet and (self.replicas or self.haproxy):
            log.info("cluster.stopped", replicas={r.name: r.proc.returncode for r in self.replicas})
