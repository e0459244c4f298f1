"""Which prompt chunks of a step share a forward pass. Pure policy over chunk lengths and measured costs.

Every forward pass reads all the weights before its first token, a fixed cost
(about 22 ms for the fp32 default on a 2-core CPU: `streamgen bench cache
--costs-only`) that a short prompt pays again and again when each prompt
runs alone. GroupQueryAttention runs several rows' prompts in one pass only
when none of them has a past, so only chunks that start an empty row can
share (engine/slots.py, `prefill_fresh`); they are right-padded to the
longest in their pass, and padding costs compute. A chunk joins a pass when
its padding costs no more than the pass of its own it saves, and the pass stays
within the runner's token capacity (rows x longest chunk).
"""

from __future__ import annotations

from collections.abc import Sequence

from streamgen.engine.slot_table import MIN_PREFILL_PASS


def shared_passes(lengths: Sequence[int], capacity: int, fixed_ms: float, per_token_ms: float) -> list[list[int]]:
    """Group chunks (their indices into `lengths`) into passes; a group of one runs alone. Longest first, so
    each pass is as long as its first chunk. A chunk shorter than MIN_PREFILL_PASS always runs alone."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    passes: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if passes and n >= MIN_PREFILL_PASS:
            group = passes[-1]
            width = lengths[group[0]]
            # Longest first: the group's head is at least n long, so at least MIN_PREFILL_PASS too.
            if (len(group) + 1) * width <= capacity and (width - n) * per_token_ms <= fixed_ms:
                group.append(i)
                continue
        passes.append([i])
    return passes
