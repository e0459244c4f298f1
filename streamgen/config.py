"""Settings: one frozen object, built once from flags and environment; each setting defined once.

Every setting is a field of Settings, and its field carries all there is to
say about it: default, help, choices and range (the engine's knobs take
theirs from engine/config.py). From that one table come the flags
(`--max-batch`, for every command that takes the setting), the environment
variables (`STREAMGEN_MAX_BATCH`; the flag wins), the checks with their
messages, and the README's settings table (tests/record_docs.py; checked by
tests/test_docs.py). The environment is read when the command line is
parsed, never at import time.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from streamgen.engine.config import DEVICE_CHOICES, EngineConfig, knob
from streamgen.errors import ConfigError
from streamgen.model_files import DEFAULT_MODEL, DEFAULT_QUANTIZATION, GRAPHS, KV_CACHES, PRECISIONS, QUANTIZATIONS, Build

ENV_PREFIX = "STREAMGEN_"


def setting(default: Any, help: str, *, choices: Iterable[str] | None = None, minimum: float | None = None,
            maximum: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "min": minimum, "max": maximum})


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = setting("127.0.0.1", "interface to listen on; 0.0.0.0 for all")
    port: int = setting(8000, "TCP port", minimum=0, maximum=65535)
    model: str = setting(DEFAULT_MODEL, "model name, hub id or local Hugging Face directory; pulled when missing")
    quantize: str = setting(DEFAULT_QUANTIZATION, "the build: none = fp32; int8 / int4 = MatMulNBits with 8-bit "
                            "weights in blocks of 64 / 4-bit in blocks of 32; source = the GGUF source's own levels "
                            "repacked without re-quantizing (docs/benchmarks.md compares them)", choices=QUANTIZATIONS)
    precision: str = setting("auto", "activations (and KV cache) of the build: fp32, fp16, or auto = fp16 on CUDA (its "
                             "attention kernels need it), fp32 on a CPU", choices=("auto", *PRECISIONS))
    kv_cache: str = setting("auto", "auto: the KV cache in the activations' type; int8: 8-bit with calibrated scales, "
                            "a quarter of fp32's memory (docs/benchmarks.md)", choices=KV_CACHES)
    graph: str = setting("auto", "ONNX graph: gqa = GroupQueryAttention with static KV slots, plain = Optimum's export "
                         "with a concatenated cache (one request at a time), auto = gqa where the model allows it",
                         choices=GRAPHS)
    device: str = setting("auto", "auto, cpu or cuda; auto uses CUDA only when it is really usable",
                          choices=DEVICE_CHOICES)
    cuda_graphs: str = setting("off", "on: with CUDA, capture each decode batch width once as a CUDA graph and replay "
                               "it every step (docs/gpu.md); off: launch the kernels every step", choices=("on", "off"))
    threads: int = setting(0, "ONNX Runtime intra-op threads; 0 = one per physical core", minimum=0)
    home: str | None = setting(None, "model cache directory; unset: ~/.cache/streamgen")
    torch_index_url: str | None = setting(None, "where the export toolchain (made on the first pull that needs it) "
                                          "gets PyTorch; unset: PyTorch's CPU index "
                                          "(https://download.pytorch.org/whl/cpu) when no NVIDIA GPU is present and "
                                          "it answers, PyPI otherwise; empty: PyPI")
    max_batch: int = knob("max_batch")
    max_context: int = knob("max_context")
    max_queued: int = knob("max_queued")
    token_budget: int = knob("token_budget")
    prefill_chunk: int = knob("prefill_chunk")
    speculation: str = knob("speculation")
    prefix_cache: str = setting("on", "on: a slot keeps its KV after its request ends, and a prompt that shares a "
                                "prefix with a slot's tokens prefills only the rest (multi-turn chat, shared system "
                                "prompts); off: every prompt is prefilled in full", choices=("on", "off"))
    itl_target_ms: float | None = knob("itl_target_ms")
    max_requests_per_connection: int = setting(8, "requests in flight at once on one WebSocket", minimum=1)
    max_message_bytes: int = setting(65536, "largest WebSocket message or HTTP body accepted; larger WebSocket "
                                     "messages close the socket with 1009", minimum=1024)
    max_unsent_messages: int = setting(1024, "messages a WebSocket client may leave unread beyond what the network "
                                       "holds; then it is closed with 1008 and its requests are cancelled",
                                       minimum=16)
    max_prompt_tokens: int | None = knob("max_prompt_tokens")
    max_new_tokens: int | None = knob("max_new_tokens")
    max_constraint_bytes: int = knob("max_constraint_bytes")
    max_compile_ms: float = knob("max_compile_ms")
    max_connections: int = setting(256, "open WebSocket connections; more are refused with 503", minimum=1)
    idle_timeout: int = setting(300, "seconds a connection may stay silent with nothing in flight before it is "
                                "closed; 0 = never", minimum=0)
    rate_limit: int = setting(600, "generate requests per minute per client (API key, else address: behind a "
                              "proxy, the forwarded one with --forwarded-allow-ips); 0 = no limit", minimum=0)
    forwarded_allow_ips: str = setting("", "comma-separated addresses (or *) of proxies whose X-Forwarded-For is "
                                       "believed: requests from them count as from the client they forward, in "
                                       "rate limits and logs (uvicorn's flag); unset: believed from nobody")
    replica_id: str | None = setting(None, "this replica's name: in the X-Streamgen-Replica response header, on "
                                     "every log line and span; unset: the host name")
    api_key: str | None = setting(None, "require this key (Authorization: Bearer KEY, or the WebSocket subprotocol "
                                  "bearer.KEY); several keys separated by commas, one per client: each key's "
                                  "requests reuse only their own KV cache; unset: the server is open")
    api_key_file: str | None = setting(None, "read the API keys from this file instead, one per line; unset: none")
    allowed_origins: str = setting("", "comma-separated extra Origins allowed to open WebSockets (same origin and "
                                   "loopback always are); unset: none")
    shutdown_grace: int = setting(15, "seconds running requests get to finish after SIGTERM before they end with "
                                  "shutting_down", minimum=0)
    trace_detail: str = setting("token", "token: forward/sample/detokenize spans per generated token; request: one "
                                "decode span per request", choices=("token", "request"))
    log_level: str = setting("info", "debug, info, warning or error", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("auto", "auto (JSON lines unless on a terminal), json or console",
                              choices=("auto", "json", "console"))
    log_prompts: bool = setting(False, "log prompt text at info level (otherwise only at debug)")
    jaeger_url: str | None = setting(None, "Jaeger UI base URL; the browser client links each answer's trace there; "
                                     "unset: no links")
    price_per_hour: float | None = setting(None, "what this machine costs an hour, in USD: each answer then reports "
                                           "its cost (its share of the engine's busy time) in usage.cost_usd, and "
                                           "/v1/stats the cost per million tokens; unset: no costs", minimum=0)


SETTINGS: dict[str, Field] = {f.name: f for f in fields(Settings)}


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_of(name: str) -> str:
    return SETTINGS[name].metadata["help"]


def default_text(name: str) -> str | None:
    """A setting's default as the help and the README show it; None when unset (the help says what that means)."""
    value = SETTINGS[name].default
    if value is None or value == "":
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)


def help_text(name: str, meaning: str | None = None) -> str:
    default = default_text(name)
    text = meaning or help_of(name)
    return f"{text} [env {env_name(name)}" + (f"; default {default}]" if default is not None else "]")


def _is_int(type_name: str) -> bool:
    return type_name in ("int", "int | None")


def _is_float(type_name: str) -> bool:
    return type_name in ("float", "float | None")


def _converter(name: str) -> Callable[[str], Any]:
    """Text to a setting's value, checked against its type, choices and range: the same for a flag and for its
    environment variable. Raises ValueError with what was expected."""
    spec = SETTINGS[name]
    lo, hi, choices = spec.metadata.get("min"), spec.metadata.get("max"), spec.metadata.get("choices")
    integer, number = _is_int(spec.type), _is_float(spec.type)

    def convert(text: str) -> Any:
        if choices and text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {text!r}")
        if not (integer or number):
            return text
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise ValueError(f"must be {'an integer' if integer else 'a number'}, got {text!r}") from None
        if not value == value or value in (float("inf"), float("-inf")):
            raise ValueError(f"must be a finite number, got {text!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"between {lo:g} and {hi:g}" if hi is not None else f"at least {lo:g}"
            raise ValueError(f"must be {bounds}, got {text}")
        return value

    return convert


def _flag_type(name: str) -> Callable[[str], Any]:
    convert = _converter(name)

    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def add_settings_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, names: Iterable[str] | None = None,
                       meanings: dict[str, str] | None = None) -> None:
    """Flags for these settings (all by default), each read with settings_from_args: the flag, else its
    environment variable, else the default. meanings: a command's own wording of a setting's help."""
    meanings = meanings or {}
    for name in names or SETTINGS:
        spec = SETTINGS[name]
        text = help_text(name, meanings.get(name)).replace("%", "%%")
        choices = spec.metadata.get("choices")
        if spec.type == "bool":
            parser.add_argument(flag_name(name), dest=name, default=None, action=argparse.BooleanOptionalAction,
                                help=text)
        else:
            parser.add_argument(flag_name(name), dest=name, default=None, type=_flag_type(name),
                                metavar="{" + ",".join(choices) + "}" if choices else None, help=text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flag, else environment variable, else default; checked with clear messages."""
    values: dict[str, Any] = {}
    for name, spec in SETTINGS.items():
        value = getattr(args, name, None)
        if value is None and (raw := os.environ.get(env_name(name))) not in (None, ""):
            value = _from_env(name, spec.type, raw)
        if value is not None:
            values[name] = value
    settings = Settings(**values)
    if settings.api_key_file and not settings.api_key:
        try:
            lines = Path(settings.api_key_file).expanduser().read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read API keys from {settings.api_key_file}: {exc.strerror}") from None
        keys = [line.strip() for line in lines if line.strip()]
        if not keys:
            raise ConfigError(f"{settings.api_key_file} holds no API key (one per line)")
        settings = replace(settings, api_key=",".join(keys))
    if settings.api_key is not None and not all(_TOKEN.fullmatch(k) for k in settings.api_key.split(",")):
        raise ConfigError("an API key must be 16+ characters of A-Z a-z 0-9 - _ . ~ "
                          "(it travels in a WebSocket subprotocol); make one with: python -c "
                          "'import secrets; print(secrets.token_urlsafe(32))'")
    return settings


def serving_build(quantization: str, precision: str, kv_cache: str, device_kind: str) -> Build:
    """The build to serve: precision auto is fp16 on CUDA, whose attention kernels need it, and fp32 on a CPU."""
    if precision == "auto":
        precision = "fp16" if device_kind == "cuda" else "fp32"
    return Build(quantization, precision, kv_cache)


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's configuration from the server's settings (checked there: limits within the context)."""
    values = {
        "max_batch": settings.max_batch, "max_context": settings.max_context, "max_queued": settings.max_queued,
        "token_budget": settings.token_budget, "prefill_chunk": settings.prefill_chunk,
        "max_prompt_tokens": settings.max_prompt_tokens, "max_new_tokens": settings.max_new_tokens,
        "max_constraint_bytes": settings.max_constraint_bytes, "max_compile_ms": settings.max_compile_ms,
        "prefix_cache": settings.prefix_cache == "on", "speculation": settings.speculation,
        "itl_target_ms": settings.itl_target_ms or None,  # 0 turns it off
    }
    try:
        return EngineConfig(**values)
    except ValueError as exc:
        message = str(exc)
        for name in values:
            message = message.replace(name, flag_name(name))
        raise ConfigError(message) from None


def api_keys(settings: Settings) -> tuple[str, ...]:
    """The keys a client may use; empty when the server is open."""
    return tuple(settings.api_key.split(",")) if settings.api_key else ()


_TOKEN = re.compile(r"[A-Za-z0-9\-_.~]{16,}")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _from_env(name: str, type_name: str, raw: str) -> Any:
    if type_name == "bool":
        if raw.lower() not in _TRUE + _FALSE:
            raise ConfigError(f"{env_name(name)} must be true or false, got {raw!r}")
        return raw.lower() in _TRUE
    try:
        return _converter(name)(raw)
    except ValueError as exc:
        raise ConfigError(f"{env_name(name)} {exc}") from None
