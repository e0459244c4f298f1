"""The workload both servers get: chat prompts sized in tokens, the same request as each server's API
spells it, and each server as the clients see it (a Target: a name and how one request is sent)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from streamgen.bench.clients import Streamed, sse_request, websocket_request
from streamgen.bench.common import ServeProcess
from streamgen.bench.llama_server import LlamaServer
from streamgen.bench.quality import load_texts

STREAMGEN, LLAMA = "streamgen", "llama-server"


def sized_prompts(encode: Callable[[str], list[int]], targets: Sequence[int], words: Sequence[str],
                  stride: int = 53) -> list[str]:
    """One text per target: words from a different offset each, grown until the text has at least that
    many tokens (the served model's tokenizer, without the chat template)."""
    prompts = []
    for i, target in enumerate(targets):
        start = (i * stride) % max(1, len(words) - 1)
        n = 1
        while len(encode(text := " ".join(words[start : start + n]))) < target and start + n < len(words):
            n += 1
        prompts.append(text)
    return prompts


def prompt_words() -> list[str]:
    return " ".join(load_texts() * 4).split()


def streamgen_frame(rid: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The WebSocket generate frame for one request of the workload."""
    return {"type": "generate", "id": rid, "messages": [{"role": "user", "content": prompt}],
            "params": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}}


def streamgen_body(prompt: str, max_tokens: int) -> dict[str, Any]:
    """The /v1/chat/completions body for one request of the workload (streamgen's OpenAI API)."""
    return {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True}


def llama_body(prompt: str, max_tokens: int, cache_prompt: bool) -> dict[str, Any]:
    """The /v1/chat/completions body for llama-server: greedy, end of sequence ignored, and its own
    per-request switch for prompt caching (on by default in llama-server, so always sent)."""
    return {"model": "bench", "messages": [{"role": "user", "content": prompt}], "temperature": 0,
            "max_tokens": max_tokens, "ignore_eos": True, "cache_prompt": cache_prompt}


@dataclass(frozen=True, slots=True)
class Target:
    """One server: a name and how one request of the workload is sent to it."""

    name: str
    send: Callable[[str, str, int], Awaitable[Streamed]]  # (request id, prompt, max_tokens)
    transport: str


def streamgen_target(server: ServeProcess, transport: str) -> Target:
    if transport == "websocket":
        return Target(STREAMGEN, lambda rid, p, n: websocket_request(server.ws_url, streamgen_frame(rid, p, n)),
                      "WebSocket /v1/ws")
    return Target(STREAMGEN, lambda rid, p, n: sse_request(server.url, streamgen_body(p, n)),
                  "SSE /v1/chat/completions")


def llama_target(server: LlamaServer, cache_prompt: bool) -> Target:
    return Target(LLAMA, lambda rid, p, n: sse_request(server.url, llama_body(p, n, cache_prompt)),
                  "SSE /v1/chat/completions")


def together_frames(prompts: Sequence[str], tokens: int) -> list[dict[str, Any]]:
    return [streamgen_frame(f"t{i}", p, tokens) for i, p in enumerate(prompts)]
