"""Server settings: one frozen object, built once from flags and environment.

Every setting has a flag (`--max-batch`) and an environment variable
(`STREAMGEN_MAX_BATCH`); the flag wins. The environment is read when the
command line is parsed, never at import time.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from streamgen.models.cache import DEFAULT_MODEL, GRAPHS, QUANTIZATIONS

ENV_PREFIX = "STREAMGEN_"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = DEFAULT_MODEL
    quantize: str = "int8"  # docs/benchmarks.md: within 1% of fp32 perplexity at 2-3x its speed
    graph: str = "auto"
    device: str = "auto"
    threads: int = 0
    home: str | None = None
    max_batch: int = 16
    max_context: int = 2048
    max_queued: int = 64
    token_budget: int = 256
    prefill_chunk: int = 128
    prefix_cache: str = "on"
    max_requests_per_connection: int = 8
    max_message_bytes: int = 65536
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 2048
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


_HELP: dict[str, str] = {
    "host": "interface to listen on; 0.0.0.0 for all",
    "port": "TCP port",
    "model": "model name, hub id or local Hugging Face directory; pulled when missing",
    "quantize": f"weight quantization, one of {', '.join(QUANTIZATIONS)}; int8 keeps fp32 quality within 1% "
                "perplexity at 2-3x the speed, int4 is faster at batch 1 but loses quality, source keeps a GGUF "
                "source's own 4-bit levels exactly (docs/benchmarks.md)",
    "device": "auto, cpu or cuda; auto uses CUDA only when it is really usable",
    "threads": "ONNX Runtime intra-op threads; 0 = one per physical core",
    "home": "model cache directory (default ~/.cache/streamgen)",
    "graph": "auto (GroupQueryAttention where the model allows it), gqa or plain",
    "max_batch": "KV slots: requests decoded together in one forward pass (GQA graph; the plain graph has 1)",
    "max_context": "tokens per slot (prompt + output), capped by the model's context window",
    "max_queued": "requests waiting for a slot; beyond it requests are refused with 'overloaded'",
    "token_budget": "tokens per engine step: one per decoding request, the rest for prompt chunks",
    "prefill_chunk": "most prompt tokens of one request per step, so long prompts do not stall others",
    "prefix_cache": "on: a slot keeps its KV after its request ends, and a prompt that shares a prefix with a slot's "
                    "tokens prefills only the rest (multi-turn chat, shared system prompts); off: every prompt is "
                    "prefilled in full",
    "max_requests_per_connection": "requests in flight at once on one WebSocket",
    "max_message_bytes": "largest WebSocket message accepted; larger ones close the socket with 1009",
    "max_prompt_tokens": "longest prompt accepted, in tokens (also capped by the context)",
    "max_new_tokens": "largest max_tokens a request may ask for",
    "max_connections": "open WebSocket connections; more are refused with 503",
    "idle_timeout": "seconds a connection may stay silent with nothing in flight before it is closed; 0 = never",
    "rate_limit": "generate requests per minute per client (API key, else address); 0 = no limit",
    "api_key": "require this key (Authorization: Bearer KEY, or the WebSocket subprotocol bearer.KEY); several "
               "keys separated by commas, one per client: each key's requests reuse only their own KV cache",
    "api_key_file": "read the API keys from this file instead, one per line",
    "allowed_origins": "comma-separated extra Origins allowed to open WebSockets (same origin and loopback always are)",
    "shutdown_grace": "seconds running requests get to finish after SIGTERM before they end with shutting_down",
    "trace_detail": "token: forward/sample/detokenize spans per generated token; request: one decode span per request",
    "log_level": "debug, info, warning or error",
    "log_format": "auto (JSON lines unless on a terminal), json or console",
    "log_prompts": "log prompt text at info level (otherwise only at debug)",
    "jaeger_url": "Jaeger UI base URL; the browser client links each answer's trace there",
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "quantize": QUANTIZATIONS,
    "graph": GRAPHS,
    "device": ("auto", "cpu", "cuda"),
    "prefix_cache": ("on", "off"),
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


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server settings (flag, or environment variable)")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{_HELP[f.name]} [env {env_name(f.name)}, default {f.default}]".replace("%", "%%")
        if f.type == "bool":
            group.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=help_text)
            continue
        group.add_argument(
            flag, dest=f.name, default=None, choices=_CHOICES.get(f.name),
            type=int if f.type == "int" else str, help=help_text,
        )


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
            raise SystemExit(f"streamgen: {env_name(f.name)} must be one of {', '.join(_CHOICES[f.name])}, got {value!r}")
        if f.name in _MINIMUM and value < _MINIMUM[f.name]:
            raise SystemExit(f"streamgen: --{f.name.replace('_', '-')} must be at least {_MINIMUM[f.name]}, got {value}")
        values[f.name] = value
    settings = Settings(**values)
    if settings.api_key_file and not settings.api_key:
        try:
            lines = Path(settings.api_key_file).expanduser().read_text().splitlines()
        except OSError as exc:
            raise SystemExit(f"streamgen: cannot read API keys from {settings.api_key_file}: {exc.strerror}") from None
        keys = [line.strip() for line in lines if line.strip()]
        if not keys:
            raise SystemExit(f"streamgen: {settings.api_key_file} holds no API key (one per line)")
        settings = replace(settings, api_key=",".join(keys))
    if settings.api_key is not None and not all(_TOKEN.fullmatch(k) for k in settings.api_key.split(",")):
        raise SystemExit("streamgen: an API key must be 16+ characters of A-Z a-z 0-9 - _ . ~ "
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
            raise SystemExit(f"streamgen: {env_name(name)} must be true or false, got {raw!r}")
        return raw.lower() in _TRUE
    if type_name != "int":
        return raw
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"streamgen: {env_name(name)} must be an integer, got {raw!r}") from None
