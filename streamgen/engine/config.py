"""Every engine knob, named once, with its default.

The server's Settings (streamgen/config.py) are built from flags and
environment variables and turned into one EngineConfig; the runner, the
scheduler and the engine each take their part of it. Two chunk sizes are
different things and have different names: `prefill_chunk` is how many
prompt tokens of one request a step may run (a scheduling choice: smaller
chunks keep decoding streams flowing), `forward_tokens` is how many prompt
tokens one forward pass takes (a memory bound on the activations).
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_CHOICES = ("auto", "cpu", "cuda")  # auto: CUDA when it is really usable (engine/device.py)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_batch: int = 16  # KV slots: requests decoded together in one forward pass
    max_context: int = 2048  # tokens per slot, prompt plus output (capped by the model's window)
    max_queued: int = 64  # accepted requests waiting for a slot; more are refused (overloaded)
    token_budget: int = 256  # tokens per step: one per decoding request, the rest for prompt chunks
    prefill_chunk: int = 128  # most prompt tokens of one request per step
    forward_tokens: int = 256  # most prompt tokens in one forward pass
    max_prompt_tokens: int | None = None  # longest prompt accepted; None: what the context allows
    max_new_tokens: int | None = None  # largest max_tokens accepted; None: what the context allows
    prefix_cache: bool = True  # keep each slot's KV after its request and reuse shared prompt prefixes
    # A step that decodes runs only the prompt work that fits this; None: off. 150 ms keeps every stream at
    # 6.7 tokens a second or more, faster than people read, and, at 16 clients on a 2-core CPU, its p95 gap near
    # llama-server's at half its time to first token (docs/benchmarks.md, bench peers --itl-sweep).
    itl_target_ms: float | None = 150.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queued", "token_budget", "prefill_chunk", "forward_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.itl_target_ms is not None and self.itl_target_ms <= 0:
            raise ValueError(f"itl_target_ms must be positive, got {self.itl_target_ms}")
        for name in ("max_prompt_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and not 1 <= value < self.max_context:
                raise ValueError(f"{name} must be between 1 and the context ({self.max_context}) - 1, got {value}")


ENGINE_DEFAULTS = EngineConfig()
