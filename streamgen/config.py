"""Server settings: one frozen object, built once from flags and environment.

Every setting has a flag (`--max-batch`) and an environment variable
(`STREAMGEN_MAX_BATCH`); the flag wins. The environment is read when the
command line is parsed, never at import time. The engine's knobs and their
defaults live in engine/config.py; `engine_config()` maps these settings onto
them. The README's settings table is generated from this module
(tests/record_docs.py) and tests/test_docs.py checks it.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from streamgen.errors import ConfigError
from streamgen.engine.config import DEVICE_CHOICES, ENGINE_DEFAULTS, EngineConfig
from streamgen.model_files import DEFAULT_MODEL, DEFAULT_QUANTIZATION, GRAPHS, KV_CACHES, PRECISIONS, QUANTIZATIONS, Build

ENV_PREFIX = "STREAMGEN_"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = DEFAULT_MODEL
    quantize: str = DEFAULT_QUANTIZATION
    precision: str = "auto"
    kv_cache: str = "auto"
    graph: str = "auto"
    device: str = "auto"
    cuda_graphs: str = "off"
    threads: int = 0
    home: str | None = None
    torch_index_url: str | None = None
    max_batch: int = ENGINE_DEFAULTS.max_batch
    max_context: int = ENGINE_DEFAULTS.max_context
    max_queued: int = ENGINE_DEFAULTS.max_queued
    token_budget: int = ENGINE_DEFAULTS.token_budget
    prefill_chunk: int = ENGINE_DEFAULTS.prefill_chunk
    prefix_cache: str = "on" if ENGINE_DEFAULTS.prefix_cache else "off"
    itl_target_ms: float | None = ENGINE_DEFAULTS.itl_target_ms
    max_requests_per_connection: int = 8
    max_message_bytes: int = 65536
    max_prompt_tokens: int | None = ENGINE_DEFAULTS.max_prompt_tokens
    max_new_tokens: int | None = ENGINE_DEFAULTS.max_new_tokens
    max_connections: int = 256
    idle_timeout: int = 300
    rate_limit: int = 120
    api_key: str | None = None
    api_key_file: str | None = None
    allowed_origins: str = ""
    shutdown_grace: int = 15
    trace_detail: str = "token"
    log_level: str = "info"
    log_format: str = "auto"
    log_prompts: bool = False
    jaeger_url: str | None = None
    price_per_hour: float | None = None


_HELP: dict[str, str] = {
    "host": "interface to listen on; 0.0.0.0 for all",
    "port": "TCP port",
    "model": "model name, hub id or local Hugging Face directory; pulled when missing",
    "quantize": f"the build to serve, one of {', '.join(QUANTIZATIONS)} (docs/benchmarks.md compares them)",
    "precision": "activations (and KV cache) of the build: fp32, fp16, or auto = fp16 on CUDA (its attention "
                 "kernels need it), fp32 on a CPU",
    "kv_cache": "auto: the KV cache in the activations' type; int8: 8-bit with calibrated scales, a quarter of "
                "fp32's memory (docs/benchmarks.md)",
    "device": "auto, cpu or cuda; auto uses CUDA only when it is really usable",
    "cuda_graphs": "on: with CUDA, capture each decode batch width once as a CUDA graph and replay it every step "
                   "(docs/gpu.md); off: launch the kernels every step",
    "threads": "ONNX Runtime intra-op threads; 0 = one per physical core",
    "home": "model cache directory; unset: ~/.cache/streamgen",
    "torch_index_url": "where the export toolchain (made on the first pull that needs it) gets PyTorch; unset: "
                       "PyTorch's CPU index (https://download.pytorch.org/whl/cpu) when no NVIDIA GPU is present, "
                       "PyPI otherwise; empty: PyPI",
    "graph": "auto (GroupQueryAttention where the model allows it), gqa or plain",
    "max_batch": "KV slots: requests decoded together in one forward pass (GQA graph; the plain graph has 1)",
    "max_context": "tokens per slot (prompt + output), capped by the model's context window",
    "max_queued": "requests waiting for a slot; beyond it requests are refused with 'overloaded'",
    "token_budget": "tokens per engine step: one per decoding request, the rest for prompt chunks",
    "prefill_chunk": "most prompt tokens of one request per step, so long prompts do not stall others",
    "itl_target_ms": "inter-token latency target: a step that decodes runs only as many prompt tokens as fit "
                     "beside the decode in this many ms (by the step costs the engine measures), so streams do not "
                     "stall behind other users' prompts; 0 = off",
    "prefix_cache": "on: a slot keeps its KV after its request ends, and a prompt that shares a prefix with a slot's "
                    "tokens prefills only the rest (multi-turn chat, shared system prompts); off: every prompt is "
                    "prefilled in full",
    "max_requests_per_connection": "requests in flight at once on one WebSocket",
    "max_message_bytes": "largest WebSocket message accepted; larger ones close the socket with 1009",
    "max_prompt_tokens": "longest prompt accepted, in tokens; unset: the context window minus one",
    "max_new_tokens": "largest max_tokens a request may ask for; unset: what the context window leaves",
    "max_connections": "open WebSocket connections; more are refused with 503",
    "idle_timeout": "seconds a connection may stay silent with nothing in flight before it is closed; 0 = never",
    "rate_limit": "generate requests per minute per client (API key, else address); 0 = no limit",
    "api_key": "require this key (Authorization: Bearer KEY, or the WebSocket subprotocol bearer.KEY); several "
               "keys separated by commas, one per client: each key's requests reuse only their own KV cache; unset: "
               "the server is open",
    "api_key_file": "read the API keys from this file instead, one per line; unset: none",
    "allowed_origins": "comma-separated extra Origins allowed to open WebSockets (same origin and loopback always "
                       "are); unset: none",
    "shutdown_grace": "seconds running requests get to finish after SIGTERM before they end with shutting_down",
    "trace_detail": "token: forward/sample/detokenize spans per generated token; request: one decode span per request",
    "log_level": "debug, info, warning or error",
    "log_format": "auto (JSON lines unless on a terminal), json or console",
    "log_prompts": "log prompt text at info level (otherwise only at debug)",
    "jaeger_url": "Jaeger UI base URL; the browser client links each answer's trace there; unset: no links",
    "price_per_hour": "what this machine costs an hour, in USD: each answer then reports its cost (its share of "
                      "the engine's busy time) in usage.cost_usd, and /v1/stats the cost per million tokens; "
                      "unset: no costs",
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "quantize": QUANTIZATIONS,
    "graph": GRAPHS,
    "device": DEVICE_CHOICES,
    "prefix_cache": ("on", "off"),
    "cuda_graphs": ("on", "off"),
    "precision": ("auto", *PRECISIONS),
    "kv_cache": KV_CACHES,
    "trace_detail": ("token", "request"),
    "log_level": ("debug", "info", "warning", "error"),
    "log_format": ("auto", "json", "console"),
}
_MINIMUM: dict[str, int] = {
    "port": 0, "threads": 0, "max_batch": 1, "max_context": 16, "max_queued": 1, "token_budget": 1,
    "prefill_chunk": 1, "max_requests_per_connection": 1, "max_message_bytes": 1024, "max_prompt_tokens": 1,
    "max_new_tokens": 1, "max_connections": 1, "idle_timeout": 0, "rate_limit": 0, "shutdown_grace": 0,
}


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


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
        "prefix_cache": settings.prefix_cache == "on",
        "itl_target_ms": settings.itl_target_ms or None,  # 0 turns it off
    }
    try:
        return EngineConfig(**values)
    except ValueError as exc:
        message = str(exc)
        for name in values:
            message = message.replace(name, flag_name(name))
        raise ConfigError(message) from None


def default_text(name: str) -> str | None:
    """A setting's default as the help and the README show it; None when unset (the help says what that means)."""
    value = next(f.default for f in fields(Settings) if f.name == name)
    if value is None or value == "":
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)


def help_text(name: str) -> str:
    default = default_text(name)
    return f"{_HELP[name]} [env {env_name(name)}" + (f"; default {default}]" if default is not None else "]")


def _is_int(type_name: str) -> bool:
    return type_name in ("int", "int | None")


def _is_float(type_name: str) -> bool:
    return type_name in ("float", "float | None")


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server settings (flag, or environment variable)")
    for f in fields(Settings):
        flag = flag_name(f.name)
        text = help_text(f.name).replace("%", "%%")
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=text)
            continue
        kind = int if _is_int(f.type) else float if _is_float(f.type) else str
        group.add_argument(flag, dest=f.name, default=None, choices=_CHOICES.get(f.name), type=kind, help=text)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flag, else environment variable, else default; checked with clear messages."""
    values: dict[str, Any] = {}
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is None and (raw := os.environ.get(env_name(f.name))) not in (None, ""):
            value = _from_env(f.name, f.type, raw)
        if value is None:
            continue
        if f.name in _CHOICES and value not in _CHOICES[f.name]:
            raise ConfigError(f"{env_name(f.name)} must be one of {', '.join(_CHOICES[f.name])}, got {value!r}")
        if f.name in ("price_per_hour", "itl_target_ms") and not (value >= 0 and value < float("inf")):
            raise ConfigError(f"{flag_name(f.name)} must be a non-negative number, got {value}")
        if f.name in _MINIMUM and value < _MINIMUM[f.name]:
            raise ConfigError(f"{flag_name(f.name)} must be at least {_MINIMUM[f.name]}, got {value}")
        values[f.name] = value
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
    if not (_is_int(type_name) or _is_float(type_name)):
        return raw
    try:
        return int(raw) if _is_int(type_name) else float(raw)
    except ValueError:
        kind = "an integer" if _is_int(type_name) else "a number"
        raise ConfigError(f"{env_name(name)} must be {kind}, got {raw!r}") from None
