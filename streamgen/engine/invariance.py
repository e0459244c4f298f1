"""Does a batched decode step give every row exactly what it gets alone?

Continuous batching promises that a request's tokens do not depend on who
shares its steps. That holds only if the kernels compute a row the same way
in a batch of one and in a batch of many, bit for bit. ONNX Runtime's fp32
and 8-bit kernels do on every CPU tried; its 4-bit kernels do with AVX-512
but not with AVX2 (docs/benchmarks.md). The engine checks the build it
loads at start-up, `bench variants` reports it per build, and the tests
hold the shipped builds to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from streamgen.engine.executor import KVRunner
from streamgen.engine.slot_table import MIN_PREFILL_PASS


def batch_invariant(runner: KVRunner, prompts: Sequence[Sequence[int]]) -> bool:
    """Prefill the prompts together (in one shared pass where the runner has them, else each in its own
    row), decode one step for all rows together, then each row alone: True when every row's logits, after
    the prompt and after the step, are identical. Leaves every row empty and free."""
    table = runner.table
    if runner.max_slots < 2 or len(prompts) > table.free_count:
        return True  # one row at a time: nothing is ever shared
    slots = table.free_slots()[: len(prompts)]
    for slot in slots:
        table.claim(slot)
    shared = (runner.prompt_pass_tokens >= len(prompts) * max(map(len, prompts))
              and min(map(len, prompts)) >= MIN_PREFILL_PASS)
    try:
        prefilled = (runner.prefill_fresh(slots, prompts) if shared
                     else np.stack([runner.prefill(s, p) for s, p in zip(slots, prompts)]))
        firsts = [int(row.argmax()) for row in prefilled]
        together = runner.decode(slots, firsts)
    finally:
        for slot in slots:
            table.release(slot, keep_contents=False)
    slot = slots[0]
    for prompt, first, prompt_row, row in zip(prompts, firsts, prefilled, together):
        table.claim(slot)
        try:
            prompt_alone = runner.prefill(slot, prompt)
            alone = runner.decode([slot], [first])[0]
        finally:
            table.release(slot, keep_contents=False)
        if not (np.array_equal(prompt_alone, prompt_row) and np.array_equal(alone, row)):
            return False
    return True
