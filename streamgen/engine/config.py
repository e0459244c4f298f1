"""Every engine knob, named once, with its default, its meaning and its range.

The server's Settings (streamgen/config.py) take each knob's default, help
and range from here (`knob()`), are built from flags and environment
variables, and become one EngineConfig; the runner, the scheduler and the
engine each take their part of it. Two chunk sizes are different things and
have different names: `prefill_chunk` is how many prompt tokens of one
request a step may run (a scheduling choice: smaller chunks keep decoding
streams flowing), `forward_tokens` is how many prompt tokens one forward
pass takes (a memory bound on the activations).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # auto: CUDA when it is really usable (engine/device.py)


def _knob(default: Any, help: str, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "min": minimum})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch: int = _knob(16, "KV slots: requests decoded together in one forward pass (GQA graph; the plain graph "
                               "has 1)", 1)
    max_context: int = _knob(2048, "tokens per slot (prompt + output), capped by the model's context window", 16)
    max_queued: int = _knob(64, "requests waiting for a slot; beyond it requests are refused with 'overloaded'", 1)
    token_budget: int = _knob(256, "tokens per engine step: one per decoding request, the rest for prompt chunks", 1)
    prefill_chunk: int = _knob(128, "most prompt tokens of one request per step, so long prompts do not stall "
                                    "others", 1)
    forward_tokens: int = _knob(256, "most prompt tokens in one forward pass (a bound on activation memory)", 1)
    max_prompt_tokens: int | None = _knob(None, "longest prompt accepted, in tokens; unset: the context window "
                                                "minus one", 1)
    max_new_tokens: int | None = _knob(None, "largest max_tokens a request may ask for; unset: what the context "
                                             "window leaves", 1)
    max_constraint_bytes: int = _knob(32768, "largest response format, structured output or tool-call grammar a "
                                             "request may send, once serialized", 64)
    max_compile_ms: float = _knob(200.0, "the longest a request's response format, structured output or tool "
                                         "grammar may take to compile; a slower one is refused (and remembered as "
                                         "such), so no request makes others wait long behind its grammar", 1)
    speculation: str = field(default="off", metadata={
        "help": "prompt-lookup speculation for requests that do not choose: prompt_lookup (up to 8 proposed tokens "
                "a step where the answer repeats its context, decided per request by the measured costs when it "
                "starts) or off", "choices": ("off", "prompt_lookup")})
    prefix_cache: bool = _knob(True, "keep each slot's KV after its request and reuse shared prompt prefixes")
    # 150 ms keeps every stream at 6.7 tokens a second or more, faster than people read, and, at 16 clients on a
    # 2-core CPU, its p95 gap near llama-server's at half its time to first token (docs/benchmarks.md, bench
    # peers --itl-sweep).
    itl_target_ms: float | None = _knob(150.0, "inter-token latency target: a step that decodes runs only as many "
                                               "prompt tokens as fit beside the decode in this many ms (by the step "
                                               "costs the engine measures), so streams do not stall behind other "
                                               "users' prompts; 0 = off", 0)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, minimum = getattr(self, f.name), f.metadata.get("min")
            if minimum is not None and value is not None and not value >= minimum:
                raise ValueError(f"{f.name} must be at least {minimum:g}, got {value}")
        if self.itl_target_ms == 0:
            raise ValueError("itl_target_ms must be positive, or None for no target")
        for name in ("max_prompt_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value >= self.max_context:
                raise ValueError(f"{name} must be below the context ({self.max_context}), got {value}")


ENGINE_DEFAULTS = EngineConfig()


def knob(name: str) -> Any:
    """An engine knob as a field of another dataclass (the server's Settings): the same default, help and range."""
    spec = next(f for f in fields(EngineConfig) if f.name == name)
    return field(default=spec.default, metadata=dict(spec.metadata))
