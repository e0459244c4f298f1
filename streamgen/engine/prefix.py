"""Automatic prefix caching over the KV slots: which slot a new request takes,
and what it may reuse. Pure policy over the slot table: token ids, never text,
never tensors.

Decode cost grows with the highest busy row (rows run from 0 to it), so
running requests are packed into the lowest rows, and the rows above them
serve as the cache. The rule (docs/benchmarks.md, "Prefix cache", has the
measurements behind it):

1. A request may reuse a row only if the row belongs to its namespace (the
   API key it came with; one namespace when the server has no key).
2. Among the free slots, each is scored by what taking it saves minus what it
   costs: a row whose own tokens share a prefix of at least MIN_REUSE_TOKENS
   with the prompt saves prefilling them; a slot above every busy row widens
   each decode step for as long as the request decodes. Ties go to an empty
   slot, then the least recently used one, then the lowest.
3. If the chosen row holds another conversation worth keeping (at least
   MIN_REUSE_TOKENS beyond what the request keeps), and a free row holds
   something less recent (or nothing), that conversation is first moved
   there: a KV copy costs a small fraction of prefilling it again. So the
   free rows keep the most recently used conversations.
4. Whatever the slot, if another row of the namespace, busy or free, holds a
   longer prefix, the core copies the missing part across (`best_source`).
5. Whether a reuse pays at all is the scheduler's one reuse rule
   (engine/scheduler.py, `reuse_pays`), passed in as `keep_pays`: when other
   new prompts start in the same step, a reuse must also save more than a
   forward pass's fixed cost, since a row with a past prefills alone instead
   of sharing their pass.
6. At least two prompt tokens are always run: the last one's logits give the
   first output token, and a one-token pass on top of a cache would round
   differently from a solo prefill (engine/slot_table.py, MIN_PREFILL_PASS).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamgen.engine.costs import StepCosts
from streamgen.engine.slot_table import MIN_PREFILL_PASS, SlotTable, common_prefix

__all__ = ["MIN_REUSE_TOKENS", "SlotChoice", "best_source", "choose_slot", "common_prefix", "reusable"]

# Shorter shared prefixes (a chat template's opening, a default system
# prompt) are not worth taking a row that holds another conversation; the
# catch-up copy still picks them up from wherever they are.
MIN_REUSE_TOKENS = 32


@dataclass(frozen=True, slots=True)
class SlotChoice:
    slot: int
    keep: int  # leading prompt tokens the slot already holds (reused in place)
    move_to: int | None = None  # first move the slot's other contents to this free slot (rule 3)


def reusable(prompt_len: int, common: int) -> int:
    """Cached tokens a prompt may use: all it shares, but at least MIN_PREFILL_PASS tokens must run (the
    logits of the first output token come from them, and a shorter pass would round differently)."""
    return max(0, min(common, prompt_len - MIN_PREFILL_PASS))


def choose_slot(table: SlotTable, prompt: np.ndarray, namespace: str, expected_steps: int,
                costs: StepCosts, reuse: bool = True,
                keep_pays: Callable[[int], bool] = lambda n: n > 0) -> SlotChoice:
    """The free slot for a new request (the table must have one). keep_pays(n): whether keeping n of the
    prompt's tokens in place beats running them (rule 5)."""
    free = table.free_slots()
    if not free:
        raise ValueError("no free slot")
    if not reuse:
        return SlotChoice(free[0], 0)
    width = table.width()
    per_token, per_row = costs.prefill_ms_per_token(), costs.decode_row_ms()
    best: tuple | None = None
    for slot in free:
        keep = 0
        if table.namespace[slot] == namespace:
            keep = reusable(len(prompt), table.common_prefix(slot, prompt))
            if not keep_pays(keep):
                keep = 0  # a few shared tokens: worth less than sharing a prompt pass (rule 5)
        saved = keep * per_token if keep >= MIN_REUSE_TOKENS else 0.0
        widened = max(0, slot + 1 - width) * per_row * expected_steps
        # Highest score first; then empty, least recently used, lowest.
        rank = (saved - widened, table.lengths[slot] == 0, -int(table.last_used[slot]), -slot)
        if best is None or rank > best[0]:
            best = (rank, slot, keep)
    _, slot, keep = best
    return SlotChoice(slot, keep, _move_target(table, slot, keep, free))


def _move_target(table: SlotTable, slot: int, keep: int, free: list[int]) -> int | None:
    """Where the chosen slot's other contents should go, if anywhere (rule 3)."""
    held = int(table.lengths[slot])
    if held - keep < MIN_REUSE_TOKENS or _held_elsewhere(table, slot):
        return None
    # The free row holding the least valuable contents: none, else the least recently used.
    target = min((s for s in free if s != slot), default=None,
                 key=lambda s: (table.lengths[s] > 0, int(table.last_used[s])))
    if target is None or (table.lengths[target] and table.last_used[target] > table.last_used[slot]):
        return None
    return target


def _held_elsewhere(table: SlotTable, slot: int) -> bool:
    """Whether another row of the same namespace holds everything this one does."""
    held = int(table.lengths[slot])
    return any(other != slot and table.namespace[other] == table.namespace[slot] and table.lengths[other] >= held
               and table.common_prefix(other, table.tokens[slot, :held]) == held for other in range(table.size))


def best_source(table: SlotTable, prompt: np.ndarray, namespace: str, exclude: int) -> tuple[int | None, int]:
    """The row of the namespace (busy or free, other than `exclude`) holding the longest prefix of
    prompt, and how many tokens of it may be used."""
    best, longest = None, 0
    for slot in range(table.size):
        if slot == exclude or table.namespace[slot] != namespace or table.lengths[slot] <= longest:
            continue
        common = reusable(len(prompt), table.common_prefix(slot, prompt))
        if common > longest:
            best, longest = slot, common
    return best, longest
