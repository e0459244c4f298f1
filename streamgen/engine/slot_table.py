"""The slot contract: what every KV row holds, in one record.

A runner's KV cache is a set of rows (slots). For each row the table keeps the
token ids whose K/V the row holds, in order, whether a request owns it, and
whose cache it is (a namespace: requests may only reuse rows of their own
namespace). The runner writes it as it runs the model; the core and the
prefix-cache policy only read it, and claim or release rows through it.

A released row keeps its contents (its tokens and K/V) until a new owner
claims it and says how many of its leading tokens to keep; that is all the
prefix cache needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


class ContextFull(Exception):
    """A slot has no room for more tokens."""


class SlotTable:
    def __init__(self, slots: int, max_context: int) -> None:
        self.max_context = max_context
        self.tokens = np.zeros((slots, max_context), dtype=np.int32)  # [S, T]; row r holds tokens[r, :lengths[r]]
        self.lengths = np.zeros(slots, dtype=np.int64)  # [S]
        self.busy = np.zeros(slots, dtype=bool)  # [S] owned by a running request
        self.namespace = [""] * slots  # who wrote the row; reuse stays within one namespace
        self.last_used = np.zeros(slots, dtype=np.int64)  # [S] clock of the last release (0 = never used)
        self._clock = 0

    @property
    def size(self) -> int:
        return len(self.lengths)

    def copy(self) -> SlotTable:
        """An independent copy: the scheduler tries its claims and copies on one (engine/scheduler.py)."""
        other = SlotTable.__new__(SlotTable)
        other.max_context, other._clock = self.max_context, self._clock
        other.tokens, other.lengths = self.tokens.copy(), self.lengths.copy()
        other.busy, other.last_used = self.busy.copy(), self.last_used.copy()
        other.namespace = list(self.namespace)
        return other

    def free_slots(self) -> list[int]:
        return [int(s) for s in np.flatnonzero(~self.busy)]

    @property
    def free_count(self) -> int:
        return int((~self.busy).sum())

    def width(self) -> int:
        """Rows a decode step runs when every busy row takes part: 0 up to the highest busy row."""
        busy = np.flatnonzero(self.busy)
        return int(busy[-1]) + 1 if busy.size else 0

    def room(self, slot: int) -> int:
        return self.max_context - int(self.lengths[slot])

    def claim(self, slot: int, namespace: str = "", keep: int = 0) -> None:
        """Take a free row for a request, keeping its first `keep` tokens (a prefix-cache hit)."""
        if self.busy[slot]:
            raise ValueError(f"slot {slot} is already taken")
        if not 0 <= keep <= self.lengths[slot]:
            raise ValueError(f"slot {slot} holds {self.lengths[slot]} tokens; cannot keep {keep}")
        if keep and namespace != self.namespace[slot]:
            raise ValueError(f"slot {slot} belongs to another namespace; its tokens cannot be kept")
        self.busy[slot] = True
        self.lengths[slot] = keep
        self.namespace[slot] = namespace

    def release(self, slot: int, keep_contents: bool = True) -> None:
        if not self.busy[slot]:
            raise ValueError(f"slot {slot} is already free")
        self.busy[slot] = False
        self._clock += 1
        self.last_used[slot] = self._clock
        if not keep_contents:
            self.lengths[slot] = 0

    def append(self, slot: int, token_ids: Sequence[int] | np.ndarray) -> None:
        """Record that the row's K/V now also holds token_ids (the runner calls this as it writes)."""
        n, start = len(token_ids), int(self.lengths[slot])
        if n > self.max_context - start:
            raise ContextFull(f"slot {slot} has room for {self.max_context - start} tokens, got {n}")
        self.tokens[slot, start : start + n] = token_ids
        self.lengths[slot] = start + n

    def truncate(self, slot: int, length: int) -> None:
        """A busy row gives back its positions from `length` on (a speculative pass's rejected proposals):
        their K/V is garbage that nothing reads, and the row's next tokens overwrite it."""
        if not self.busy[slot] or not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"slot {slot} cannot be cut to {length} tokens")
        self.lengths[slot] = length

    def forget_last(self, slot: int) -> None:
        """Drop the last token of a free, full row (a decode step needs one position to write its filler)."""
        if self.busy[slot]:
            raise ValueError(f"slot {slot} is in use")
        self.lengths[slot] -= 1

    def common_prefix(self, slot: int, prompt: np.ndarray) -> int:
        """How many leading tokens of prompt (int32 [P]) the row holds."""
        return common_prefix(self.tokens[slot, : self.lengths[slot]], prompt)


def move_row(table: SlotTable, src: int, dst: int, copy: Callable[[int, int, int], None]) -> None:
    """Move a free row's contents to another free row, which takes over its age (so src can be taken).
    copy(src, dst, end) copies positions [0, end) and records them in the table: the runner's copy_prefix
    when the step runs, a bare table append when the scheduler tries the move on its copy of the table."""
    held, age = int(table.lengths[src]), int(table.last_used[src])
    table.claim(dst, table.namespace[src])
    copy(src, dst, held)
    table.release(dst)
    table.last_used[dst] = age


# GroupQueryAttention runs a one-token pass on top of a past through its
# decode path, which rounds differently (about 1e-5 in the logits) from the
# prompt path that a longer chunk, or a whole prompt, goes through. Prompt
# chunks are therefore never a single token on top of a past: then a prompt
# gives bit-identical K/V and logits however it is cut into chunks and
# whatever part of it came from the prefix cache, and a request gives the
# same tokens alone or in a crowd.
MIN_PREFILL_PASS = 2


def chunk_size(remaining: int, limit: int) -> int:
    """Prompt tokens to run next: about `limit`, but never a single token, and never leaving one behind."""
    n = max(min(remaining, limit), min(MIN_PREFILL_PASS, remaining))
    return remaining if remaining - n == 1 else n


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two token-id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
