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

from streamgen.engine.core import KVRunner


def batch_invariant(runner: KVRunner, prompts: Sequence[Sequence[int]]) -> bool:
    """Prefill each prompt in its own row, decode one step for all rows together, then each row alone
    after the same prefill: True when every row's logits are identical. Leaves every row empty and free."""
    table = runner.table
    if runner.max_slots < 2 or len(prompts) > table.free_count:
        return True  # one row at a time: nothing is ever shared
    slots = table.free_slots()[: len(prompts)]
    for slot in slots:
        table.claim(slot)
    try:
        firsts = [int(runner.prefill(s, p).argmax()) for s, p in zip(slots, prompts)]
        together = runner.decode(slots, firsts)
    finally:
        for slot in slots:
            table.release(slot, keep_contents=False)
    slot = slots[0]
    for prompt, first, row in zip(prompts, firsts, together):
        table.claim(slot)
        try:
            runner.prefill(slot, prompt)
            alone = runner.decode([slot], [first])[0]
        finally:
            table.release(slot, keep_contents=False)
        if not np.array_equal(alone, row):
            return False
    return True
