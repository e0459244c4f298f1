"""Requests and what comes back from them, as small typed values.

`prepare_request` turns a validated prompt or chat (server/spec.py checked
its shape) plus parameters into a GenerationRequest the engine can trust:
it tokenizes and checks what needs the model, raising a ValidationError that
names the offending field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from streamgen.engine.grammar import CompiledGrammar, ConstraintSpec, GrammarLimits
from streamgen.engine.params import DEFAULT_MAX_TOKENS, MAX_SEED, SPECULATION_OFF, SamplingParams, Speculation
from streamgen.engine.tokenizer import ChatMessage, TextTokenizer
from streamgen.engine.tools import Tool
from streamgen.errors import ValidationError


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token, stop token or stop string
    LENGTH = "length"  # max_tokens or the context window
    CANCELLED = "cancelled"  # the caller cancelled or went away
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    params: SamplingParams  # max_tokens always resolved to a number (prepare_request does it)
    stop_token_ids: frozenset[int]  # the model's end-of-sequence ids plus the request's own
    request_id: str = ""
    arrival: float | None = None  # time.perf_counter() when accepted; queue time counts from here
    namespace: str = ""  # whose KV cache this request may reuse (the API key's digest; "" when open)
    dropped_messages: int = 0  # oldest chat messages left out to fit the context (truncate="oldest")
    constraint: CompiledGrammar | None = None  # the output is held to this grammar (engine/grammar.py)


@dataclass(frozen=True, slots=True)
class TokenEvent:
    key: int  # the sequence's key: what it was added to the engine with (its index, for generate())
    index: int  # 0-based index of this token in the output
    token_id: int
    text: str  # newly streamable text; empty while bytes or a possible stop string are held back
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...] | None = None  # (token id, logprob) alternatives, most likely first


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache instead of a forward pass
    compute_s: float = 0.0  # this request's share of the engine's step time: what it cost of the machine
    proposed_tokens: int | None = None  # speculative proposals checked; None: the request did not speculate
    accepted_tokens: int = 0  # of those, kept (each saved a step)

    def cost_usd(self, price_per_hour: float | None) -> float | None:
        """The request's share of the machine at that price; None when no price is set."""
        return None if price_per_hour is None else self.compute_s * price_per_hour / 3600


@dataclass(frozen=True, slots=True)
class Timings:
    queue_s: float
    time_to_first_token_s: float
    prefill_s: float
    decode_tokens_per_s: float  # after the first token
    total_s: float
    prefill_tokens: int = 0  # prompt tokens actually run (the rest were cached)


@dataclass(frozen=True, slots=True)
class FinishEvent:
    key: int  # the sequence's key
    finish_reason: FinishReason
    tail: str  # text held back until the end (an unfinished stop-string prefix); stream it before finishing
    text: str  # the whole output text, tail included
    usage: Usage
    timings: Timings
    seed: int  # the seed used, so a sampled answer can be reproduced


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """The request failed inside the engine; the final event instead of FinishEvent."""

    key: int  # the sequence's key
    code: str  # stable error code, e.g. "internal"
    message: str  # safe to show to a client: no stack traces
    retry_after_ms: int | None = None  # for "overloaded"


Event = TokenEvent | FinishEvent | ErrorEvent


def choices(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The n sequences of one request (OpenAI's `n`): a seeded request's choices get seed, seed + 1, ...,
    so each is reproducible on its own."""
    seed = request.params.seed
    if n == 1 or seed is None:
        return [request] * n
    return [replace(request, params=replace(request.params, seed=(seed + i) % (MAX_SEED + 1))) for i in range(n)]


TRUNCATE_CHOICES = ("refuse", "oldest")  # what to do when a chat does not fit the context window


def prepare_request(
    tokenizer: TextTokenizer,
    context_length: int,
    params: SamplingParams,
    *,
    prompt: str | None = None,
    messages: Sequence[ChatMessage] | None = None,
    request_id: str = "",
    max_prompt_tokens: int | None = None,
    max_new_tokens: int | None = None,
    truncate: str = "refuse",
    namespace: str = "",
    constraint: ConstraintSpec | None = None,
    grammar_limits: GrammarLimits = GrammarLimits(),
    tools: Sequence[Tool] = (),
    speculation: Speculation = SPECULATION_OFF,
) -> GenerationRequest:
    """Tokenize and check a request against the model's limits and the server's.

    The request's shape was validated at the edge (server/spec.py); what is
    checked here needs the model: token counts, the context window, the
    vocabulary. truncate="oldest" drops the oldest non-system chat messages
    until the prompt and the output it asks for fit (the count is in
    dropped_messages); "refuse" (the default) answers context_length_exceeded
    instead.
    """
    if (prompt is None) == (messages is None) or truncate not in TRUNCATE_CHOICES:
        raise ValueError("prepare_request takes exactly one of prompt and messages, and a truncate choice")
    if max_new_tokens is not None and params.max_tokens is not None and params.max_tokens > max_new_tokens:
        raise ValidationError(
            f"max_tokens must be at most {max_new_tokens} on this server, got {params.max_tokens}",
            param="max_tokens",
        )
    # The output a request needs room for: what it asked, else the default (within the server's cap).
    wanted = params.max_tokens or (DEFAULT_MAX_TOKENS if max_new_tokens is None
                                   else min(DEFAULT_MAX_TOKENS, max_new_tokens))
    prompt_limit = context_length - 1 if max_prompt_tokens is None else min(context_length - 1, max_prompt_tokens)
    dropped = 0
    if prompt is not None:
        ids = tokenizer.encode(prompt)
    else:
        ids = tokenizer.encode(tokenizer.render_chat(messages, tools=tools))
        if truncate == "oldest":
            while len(ids) > min(prompt_limit, context_length - wanted) and (shorter := _drop_oldest(messages)):
                dropped += len(messages) - len(shorter)
                messages = shorter
                ids = tokenizer.encode(tokenizer.render_chat(messages, tools=tools))
    if not ids:
        raise ValidationError("the prompt encodes to no tokens", param="prompt", code="invalid_request")
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise ValidationError(
            f"the prompt has {len(ids)} tokens; this server accepts at most {max_prompt_tokens}",
            param="prompt",
            code="prompt_too_long",
        )
    hint = "" if truncate == "oldest" or messages is None else ', or send truncate: "oldest"'
    if len(ids) >= context_length:
        raise ValidationError(
            f"the prompt has {len(ids)} tokens but the context window is {context_length}; shorten it{hint}",
            param="prompt",
            code="context_length_exceeded",
        )
    if params.max_tokens is None:
        # Not given: the default, or whatever room the context (and the server) leaves.
        params = replace(params, max_tokens=min(wanted, context_length - len(ids)))
    elif len(ids) + params.max_tokens > context_length:
        raise ValidationError(
            f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context window "
            f"of {context_length} tokens; shorten the prompt or lower max_tokens{hint}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    for name, named in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias])):
        if any(tid >= tokenizer.vocab_size for tid in named):
            raise ValidationError(
                f"{name} token ids must be below the vocabulary size {tokenizer.vocab_size}, got {max(named)}",
                param=name,
            )
    if params.speculation is None or constraint is not None:  # the server's default; none under a grammar
        params = replace(params, speculation=speculation if constraint is None else SPECULATION_OFF)
    stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else tokenizer.stop_token_ids)
    compiled = None if constraint is None else tokenizer.grammars.compile(constraint, grammar_limits)
    return GenerationRequest(tuple(ids), params, stops, request_id, namespace=namespace, dropped_messages=dropped,
                             constraint=compiled)


def _drop_oldest(messages: Sequence[ChatMessage]) -> tuple[ChatMessage, ...] | None:
    """The chat without its oldest non-system turn (a message, and any assistant replies and tool results left
    at the front), or None when only the last message is left to drop."""
    lead = 0
    while lead < len(messages) and messages[lead].role == "system":
        lead += 1
    system, rest = list(messages[:lead]), list(messages[lead:])
    if len(rest) <= 1:
        return None
    rest = rest[1:]
    while len(rest) > 1 and rest[0].role in ("assistant", "tool"):
        rest = rest[1:]
    return (*system, *rest)
