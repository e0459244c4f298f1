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


def _text(prompt: str, chat: bool) -> dict[str, Any]:
    """The prompt as a user's chat message, or as plain text for a model with no chat template (a base model)."""
    return {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}


def openai_path(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


def streamgen_frame(rid: str, prompt: str, max_tokens: int, chat: bool = True) -> dict[str, Any]:
    """The WebSocket generate frame for one request of the workload."""
    return {"type": "generate", "id": rid, **_text(prompt, chat),
            "params": {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}}


def streamgen_body(prompt: str, max_tokens: int, chat: bool = True) -> dict[str, Any]:
    """The OpenAI body (for openai_path(chat)) of one request of the workload."""
    return {"model": "bench", **_text(prompt, chat), "temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}


def llama_body(prompt: str, max_tokens: int, cache_prompt: bool, chat: bool = True) -> dict[str, Any]:
    """The OpenAI body (for openai_path(chat)) for llama-server: greedy, end of sequence ignored, and its own
    per-request switch for prompt caching (on by default in llama-server, so always sent)."""
    return {"model": "bench", **_text(prompt, chat), "temperature": 0, "max_tokens": max_tokens,
            "ignore_eos": True, "cache_prompt": cache_prompt}


@dataclass(frozen=True, slots=True)
class Target:
    """One server: a name and how one request of the workload is sent to it."""

    name: str
    send: Callable[[str, str, int], Awaitable[Streamed]]  # (request id, prompt, max_tokens)
    transport: str


def streamgen_target(server: ServeProcess, transport: str, chat: bool = True) -> Target:
    if transport == "websocket":
        return Target(STREAMGEN, lambda rid, p, n: websocket_request(server.ws_url, streamgen_frame(rid, p, n, chat)),
                      "WebSocket /v1/ws")
    return Target(STREAMGEN, lambda rid, p, n: sse_request(server.url, streamgen_body(p, n, chat), openai_path(chat)),
                  f"SSE {openai_path(chat)}")


def llama_target(server: LlamaServer, cache_prompt: bool, chat: bool = True) -> Target:
    return Target(LLAMA, lambda rid, p, n: sse_request(server.url, llama_body(p, n, cache_prompt, chat),
                                                       openai_path(chat)),
                  f"SSE {openai_path(chat)}")


def together_frames(prompts: Sequence[str], tokens: int, chat: bool = True) -> list[dict[str, Any]]:
    return [streamgen_frame(f"t{i}", p, tokens, chat) for i, p in enumerate(prompts)]
