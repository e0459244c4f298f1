"""Prompt-lookup speculation: several tokens a step for one stream, with no draft model.

A speculative row proposes the tokens that followed the last time its
context (prompt and output so far) held its last n tokens, and one pass over
its slot (`SlotRunner.verify`: the last sampled token, then the proposals)
gives the logits after each. Greedy rows keep the longest run of proposals
that equal the argmax, plus the token at the first disagreement (or after
the last proposal). Sampled rows use the standard rejection rule for a
deterministic proposal: keep proposal d with probability p(d) under the
row's own filtered distribution, else draw from p with d taken out; so the
output distribution is exactly that of plain sampling, and a seed reproduces
its tokens. The K/V written for rejected proposals is given back
(SlotTable.truncate): nothing reads it.

The contract, and why it is kept this way: ONNX Runtime's GroupQueryAttention
runs one new token on top of a past through its decode path and several
through its prompt path, and the two round differently (about 1e-5 in the
logits, engine/slot_table.py), so a verified token can differ from the token
plain decoding would give at a near tie. A request's tokens are therefore
made to depend on its own context only: whether a request speculates is
decided once, when it takes its slot (from the measured step costs and the
load then: at high load it does not), and from then on it verifies whenever
its own context offers a proposal and decodes in the batch otherwise. So a
request with speculation gives exactly its own solo run with the same
decision, whatever joins, leaves or is cancelled around it.
docs/benchmarks.md ("Speculation") has the measured disagreement of the two
paths and the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from streamgen.engine.params import Speculation
from streamgen.engine.sampling import RowSampler, distribution


class DraftBudget:
    """How many proposals a speculative sequence makes next, from its own verification passes only (so its tokens
    still depend on nothing but its own context): halved when a pass kept none, doubled (up to max_draft) when
    it kept all; after a pass of one proposal that was not kept, COOLDOWN steps decode plainly before it
    proposes again. Where the text does not repeat its context (a story), speculation then costs a short pass
    now and then instead of a long one every step."""

    COOLDOWN = 8

    def __init__(self, spec: Speculation | None) -> None:
        self.limit = spec.max_draft if spec is not None else 0
        self.max = self.limit
        self.wait = 0  # steps left to decode plainly

    @property
    def allowed(self) -> int:
        """Proposals allowed this step; 0: decode plainly."""
        return 0 if self.wait else self.limit

    def decoded(self) -> None:
        """A plain decode step went by."""
        self.wait = max(0, self.wait - 1)

    def verified(self, proposed: int, kept: int) -> None:
        if kept == proposed:
            self.limit = min(self.max, self.limit * 2)
        elif kept == 0:
            if proposed == 1:
                self.wait = self.COOLDOWN
            self.limit = max(1, self.limit // 2)


def propose(context: np.ndarray, spec: Speculation, limit: int) -> list[int]:
    """Up to min(spec.max_draft, limit) tokens: what followed the latest earlier occurrence of the context's
    last n tokens, for the longest n in [ngram_min, ngram_max] that occurs. context: int32 [T]."""
    limit = min(spec.max_draft, limit)
    if limit <= 0:
        return []
    t = len(context)
    for n in range(min(spec.ngram_max, t - 1), spec.ngram_min - 1, -1):
        tail = context[t - n:]
        # Windows starting at 0 .. t-n-1 (the tail itself excluded), compared all at once.
        windows = np.lib.stride_tricks.sliding_window_view(context[: t - 1], n)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the latest occurrence: the most recent, most relevant continuation
            return [int(x) for x in context[start: start + limit]]
    return []


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verification pass gave one row: its tokens in order (accepted proposals, then one more), each
    with its logprob under the raw distribution and its alternatives."""

    tokens: list[int]
    logprobs: list[float]
    top_logprobs: list[tuple[tuple[int, float], ...] | None]
    accepted: int  # proposals kept


def verify(logits: np.ndarray, draft: Sequence[int], row: RowSampler) -> Verified:
    """Walk the proposals against the logits after each position [len(draft) + 1, V]: keep the agreeing ones,
    then one token more (the first disagreement's own token, or one after the last proposal)."""
    tokens: list[int] = []
    for i in range(len(draft) + 1):
        scores = row.penalized(logits[i], tokens)
        proposed = draft[i] if i < len(draft) else None
        token = _choose(scores, proposed, row)
        tokens.append(token)
        if token != proposed:
            break
    logprobs, tops = [], []
    for i, token in enumerate(tokens):
        lp, top = row.logprob(logits[i], token)
        logprobs.append(lp)
        tops.append(top)
    return Verified(tokens, logprobs, tops, accepted=len(tokens) - 1)


def _choose(scores: np.ndarray, proposed: int | None, row: RowSampler) -> int:
    """The token at one position: greedy takes the argmax; sampling keeps the proposal with its probability,
    else draws from the distribution without it (a plain draw where there is no proposal)."""
    if row.params.greedy:
        return int(np.argmax(scores))
    candidates, probs = distribution(scores, row)
    if proposed is not None:
        here = candidates == proposed
        if row.rng.random() < float(probs[here].sum()):
            return proposed
        probs = np.where(here, 0.0, probs)
    cdf = np.cumsum(probs, dtype=np.float64)
    pick = int(np.searchsorted(cdf, row.rng.random() * cdf[-1], side="right"))
    return int(candidates[min(pick, len(candidates) - 1)])
