"""Sampling parameters: one frozen dataclass, validated once at the edge.

`SamplingParams.from_mapping` is the single place where untrusted input
(CLI flags, later JSON from a socket) becomes a typed value. Everything
downstream trusts it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from streamgen.errors import ValidationError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 128
MAX_STOP_TOKEN_IDS = 64
MAX_SEED = 2**53 - 1  # largest integer a JSON client (JavaScript) holds exactly
MAX_TOP_LOGPROBS = 20  # the OpenAI API's limit
MAX_LOGIT_BIAS = 300  # entries; the OpenAI API's limit
DEFAULT_MAX_TOKENS = 256


def _param(default: Any, help: str, **flag: str) -> Any:
    """A parameter, its meaning, and how a command line spells it (flag, metavar) where that differs."""
    return field(default=default, metadata={"help": help, **flag})


MAX_DRAFT = 16  # proposals one verification pass may check
MAX_NGRAM = 8


@dataclass(frozen=True, slots=True)
class Speculation:
    """Prompt-lookup speculation (engine/speculation.py): proposals of up to max_draft tokens, found by matching
    the context's last ngram_max down to ngram_min tokens. max_draft 0: off."""

    max_draft: int = 8
    ngram_min: int = 2
    ngram_max: int = 4

    @property
    def on(self) -> bool:
        return self.max_draft > 0


SPECULATION_OFF = Speculation(max_draft=0)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each token and when to stop.

    temperature 0 means greedy. Filters apply in the order: penalties,
    temperature, top-k, top-p, min-p (the order vLLM uses).
    """

    # The defaults (temperature 0.1, top-p 0.5) are what `streamgen bench quality --sampling` chose: the
    # sampled setting that keeps every answer of its question set (docs/benchmarks.md, "Default sampling
    # settings"). A request that sets temperature alone keeps top_p's default; send top_p 1 for the plain
    # distribution.
    temperature: float = _param(0.1, "sampling temperature; 0 = greedy")
    top_k: int = _param(0, "keep the k most likely tokens; 0 = off")
    top_p: float = _param(0.5, "nucleus sampling: keep the smallest set with this probability mass; 1 = off")
    min_p: float = _param(0.0, "drop tokens below min_p x the top token's probability; 0 = off")
    repetition_penalty: float = _param(1.0, "divide logits of tokens already in prompt or output; 1 = off")
    presence_penalty: float = _param(0.0, "subtract from logits of tokens already generated, in [-2, 2] "
                                          "(OpenAI semantics)")
    frequency_penalty: float = _param(0.0, "subtract per occurrence in the output, in [-2, 2]")
    max_tokens: int | None = _param(None, f"maximum tokens to generate (default {DEFAULT_MAX_TOKENS}, or less when "
                                          "the context window is shorter)")
    stop: tuple[str, ...] = _param((), "stop string; repeat the flag for several; never printed", metavar="TEXT")
    stop_token_ids: tuple[int, ...] = _param((), "extra token id that ends generation; repeat for several",
                                             flag="--stop-token-id", metavar="ID")
    ignore_eos: bool = _param(False, "keep generating past end-of-sequence tokens (benchmarks)")
    seed: int | None = _param(None, "random seed; the same prompt, parameters and seed give the same tokens")
    logprobs: bool = _param(False, "report the log-probability of each chosen token")
    top_logprobs: int = _param(0, f"with logprobs: also the most likely alternatives at each position, "
                                  f"0-{MAX_TOP_LOGPROBS}")
    logit_bias: tuple[tuple[int, float], ...] = _param((), "ID=BIAS: add BIAS (-100 to 100) to token ID's logit "
                                                           "before any filter; repeat for several (-100 bans a token)",
                                                       metavar="ID=BIAS")
    speculation: Speculation | None = _param(None, "prompt-lookup speculation: several tokens a step where the "
                                                   "text repeats its context; unset: the server's default",
                                             flag="--speculation", metavar="K")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SamplingParams:
        """Build from untrusted key/values; raises ValidationError naming the parameter."""
        if not isinstance(raw, Mapping):
            raise ValidationError(f"params must be an object, got {_type_name(raw)}", param="params")
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                allowed = ", ".join(sorted(known))
                raise ValidationError(f"unknown parameter {key!r}; allowed: {allowed}", param=str(key))
        values = {name: _CHECKS[name](name, raw[name]) for name in raw}
        if values.get("top_logprobs") and not values.get("logprobs"):
            raise ValidationError("top_logprobs needs logprobs: true", param="top_logprobs")
        return cls(**values)


# ----------------------------------------------------------------------------
# Checks: each takes (name, value) and returns the normalised value.


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{name} must be a number, got {_type_name(value)}", param=name)
    value = float(value)
    lo_ok = value > lo if lo_open else value >= lo
    if not math.isfinite(value) or not lo_ok or value > hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValidationError(f"{name} must be in {interval}, got {value:g}", param=name)
    return value


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{name} must be an integer, got {_type_name(value)}", param=name)
    if not lo <= value <= hi:
        raise ValidationError(f"{name} must be in [{lo}, {hi}], got {value}", param=name)
    return value


def _stop(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValidationError(f"{name} must be a string or a list of strings, got {_type_name(value)}", param=name)
    if len(value) > MAX_STOP_STRINGS:
        raise ValidationError(f"{name} allows at most {MAX_STOP_STRINGS} strings, got {len(value)}", param=name)
    for item in value:
        if not isinstance(item, str) or not item:
            raise ValidationError(f"{name} entries must be non-empty strings, got {item!r:.40}", param=name)
        if len(item) > MAX_STOP_STRING_CHARS:
            raise ValidationError(
                f"{name} entries must be at most {MAX_STOP_STRING_CHARS} characters, got {len(item)}", param=name
            )
    return tuple(value)


def _stop_token_ids(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        raise ValidationError(f"{name} must be a list of integers, got {_type_name(value)}", param=name)
    if len(value) > MAX_STOP_TOKEN_IDS:
        raise ValidationError(f"{name} allows at most {MAX_STOP_TOKEN_IDS} ids, got {len(value)}", param=name)
    # The upper bound is the vocabulary size, checked where the model is known.
    return tuple(_integer(name, item, 0, 2**31 - 1) for item in value)


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(f"{name} must be true or false, got {_type_name(value)}", param=name)
    return value


def _logit_bias(name: str, value: Any) -> tuple[tuple[int, float], ...]:
    """{token id: bias}; ids may come as strings (JSON object keys always are)."""
    if not isinstance(value, Mapping):
        raise ValidationError(f"{name} must be an object mapping token ids to numbers, got {_type_name(value)}",
                              param=name)
    if len(value) > MAX_LOGIT_BIAS:
        raise ValidationError(f"{name} allows at most {MAX_LOGIT_BIAS} entries, got {len(value)}", param=name)
    out = []
    for key, bias in value.items():
        if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
            raise ValidationError(f"{name} keys must be token ids, got {str(key)[:40]!r}", param=name)
        # The upper bound is the vocabulary size, checked where the model is known.
        out.append((_integer(name, int(key), 0, 2**31 - 1), _number(name, bias, -100.0, 100.0)))
    return tuple(sorted(out))


def _speculation(name: str, value: Any) -> Speculation | None:
    """{"type": "prompt_lookup", "max_draft": K, "ngram": [min, max]} (K and ngram optional), or
    {"type": "off"}; null: the server's default. A number K is prompt lookup with up to K proposals (the CLI)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return Speculation(max_draft=_integer(name, value, 0, MAX_DRAFT))
    if not isinstance(value, Mapping) or value.get("type") not in ("prompt_lookup", "off"):
        raise ValidationError(f'{name} must be {{"type": "prompt_lookup", "max_draft": K, "ngram": [min, max]}} '
                              f'or {{"type": "off"}}, got {str(value)[:60]}', param=name)
    extra = set(value) - {"type", "max_draft", "ngram"}
    if extra:
        raise ValidationError(f"{name}: unknown field {sorted(extra)[0]!r}; allowed: type, max_draft, ngram",
                              param=name)
    if value["type"] == "off":
        return SPECULATION_OFF
    k = _integer(f"{name}.max_draft", value.get("max_draft", Speculation.max_draft), 1, MAX_DRAFT)
    ngram = value.get("ngram", [Speculation.ngram_min, Speculation.ngram_max])
    if (not isinstance(ngram, (list, tuple)) or len(ngram) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in ngram)
            or not 1 <= ngram[0] <= ngram[1] <= MAX_NGRAM):
        raise ValidationError(f"{name}.ngram must be [min, max] with 1 <= min <= max <= {MAX_NGRAM}", param=name)
    return Speculation(k, ngram[0], ngram[1])


def _seed(name: str, value: Any) -> int | None:
    return None if value is None else _integer(name, value, 0, MAX_SEED)


_CHECKS = {
    "temperature": lambda n, v: _number(n, v, 0.0, 10.0),
    "top_k": lambda n, v: _integer(n, v, 0, 1_000_000),
    "top_p": lambda n, v: _number(n, v, 0.0, 1.0, lo_open=True),
    "min_p": lambda n, v: _number(n, v, 0.0, 1.0),
    "repetition_penalty": lambda n, v: _number(n, v, 0.0, 10.0, lo_open=True),
    "presence_penalty": lambda n, v: _number(n, v, -2.0, 2.0),
    "frequency_penalty": lambda n, v: _number(n, v, -2.0, 2.0),
    "max_tokens": lambda n, v: None if v is None else _integer(n, v, 1, 1_000_000),
    "stop": _stop,
    "stop_token_ids": _stop_token_ids,
    "ignore_eos": _flag,
    "seed": _seed,
    "logprobs": _flag,
    "top_logprobs": lambda n, v: _integer(n, v, 0, MAX_TOP_LOGPROBS),
    "logit_bias": _logit_bias,
    "speculation": _speculation,
}

assert set(_CHECKS) == {f.name for f in fields(SamplingParams)}, "every parameter needs a check"

__all__ = ["SamplingParams"]
