"""Batch-shaped sampling: logits [B, V] -> token ids [B] (+ logprobs).

Pure numpy. Each row keeps its own parameters, random generator and token
counts, so a row samples the same tokens whatever else shares its batch.

Speed matters: at 100+ tokens/s a full sort of 49k logits per row would be a
visible share of a step. Top-k uses argpartition; top-p without top-k widens
an argpartition window until the nucleus fits inside it, so the common case
sorts a few dozen candidates, not the whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from streamgen.engine.params import SamplingParams

_TOP_P_FIRST_WINDOW = 64
Alternatives = tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


class RowSampler:
    """Per-request sampling state: parameters, RNG and token history."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Iterable[int], seed: int) -> None:
        self.params = params
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        # Counts are only kept when a penalty needs them: [V] arrays per row.
        self._output_counts: np.ndarray | None = None
        self._seen: np.ndarray | None = None
        self._bias: tuple[np.ndarray, np.ndarray] | None = None  # (token ids, biases)
        if params.logit_bias:
            ids, biases = zip(*params.logit_bias)
            self._bias = (np.asarray(ids, dtype=np.int64), np.asarray(biases, dtype=np.float32))
        if params.uses_penalties:
            self._output_counts = np.zeros(vocab_size, dtype=np.int32)
            self._seen = np.zeros(vocab_size, dtype=bool)
            self._seen[np.fromiter(prompt_ids, dtype=np.int64)] = True

    def observe(self, token_id: int) -> None:
        """Record a generated token (for the penalties)."""
        if self._output_counts is not None:
            self._output_counts[token_id] += 1
            self._seen[token_id] = True

    def penalized(self, logits: np.ndarray, pending: Sequence[int] = ()) -> np.ndarray:
        """Biased and penalised logits as if the `pending` tokens had been observed too (the proposals a
        speculative pass kept so far), without observing them."""
        if not pending or self._output_counts is None:
            return self.apply_penalties(logits)
        counts, seen = self._output_counts.copy(), self._seen.copy()
        np.add.at(self._output_counts, np.asarray(pending, dtype=np.int64), 1)
        self._seen[np.asarray(pending, dtype=np.int64)] = True
        try:
            return self.apply_penalties(logits)
        finally:
            self._output_counts, self._seen = counts, seen

    def logprob(self, raw: np.ndarray, token: int) -> tuple[float | None, Alternatives | None]:
        """A token's log-probability under the raw distribution, and the alternatives, where asked for."""
        if not self.params.logprobs:
            return None, None
        norm = _logsumexp(raw)
        top = None
        if k := self.params.top_logprobs:
            best = np.argpartition(-raw, k - 1)[:k]
            best = best[np.argsort(-raw[best], kind="stable")]
            top = tuple((int(t), float(raw[t] - norm)) for t in best)
        return float(raw[token] - norm), top

    def apply_penalties(self, logits: np.ndarray) -> np.ndarray:
        """Return biased and penalised logits for one row ([V], a new array when changed)."""
        p = self.params
        if self._output_counts is None and self._bias is None:
            return logits
        out = logits.astype(np.float32, copy=True)
        if self._bias is not None:
            out[self._bias[0]] += self._bias[1]
        if self._output_counts is None:
            return out
        if p.repetition_penalty != 1.0:
            # CTRL-style: shrink positive logits, grow negative ones.
            seen = self._seen
            out[seen] = np.where(out[seen] > 0, out[seen] / p.repetition_penalty, out[seen] * p.repetition_penalty)
        if p.frequency_penalty or p.presence_penalty:
            counts = self._output_counts
            out -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return out




@dataclass(frozen=True, slots=True)
class SampleOutput:
    token_ids: np.ndarray  # [B] int64
    logprobs: np.ndarray  # [B] float32; log p(token) under the model's raw distribution
    top_logprobs: list[Alternatives | None]  # per row: the most likely tokens, when the row asked for them


def sample(logits: np.ndarray, rows: Sequence[RowSampler],
           allowed: Sequence[np.ndarray | None] | None = None) -> SampleOutput:
    """Pick one token per row. logits: [B, V] float32, one RowSampler per row. allowed: per row, None or the
    tokens a constraint allows (bool [V]); applied before any other filter. Logprobs stay the raw
    distribution's."""
    batch = logits.shape[0]
    if batch != len(rows):
        raise ValueError(f"logits has {batch} rows but {len(rows)} samplers were given")
    token_ids = np.empty(batch, dtype=np.int64)
    logprobs = np.zeros(batch, dtype=np.float32)
    top: list[Alternatives | None] = [None] * batch
    for i, row in enumerate(rows):
        raw = logits[i]
        mask = allowed[i] if allowed is not None else None
        if mask is not None and not mask.any():
            raise ValueError("the constraint allows no token here")
        token = _sample_row(row.apply_penalties(raw if mask is None else np.where(mask, raw, -np.inf)), row)
        token_ids[i] = token
        if row.params.logprobs:
            norm = _logsumexp(raw)
            logprobs[i] = raw[token] - norm
            if k := row.params.top_logprobs:
                best = np.argpartition(-raw, k - 1)[:k]
                best = best[np.argsort(-raw[best], kind="stable")]
                top[i] = tuple((int(t), float(raw[t] - norm)) for t in best)
    return SampleOutput(token_ids, logprobs, top)


def _sample_row(logits: np.ndarray, row: RowSampler) -> int:
    if row.params.greedy:
        return int(np.argmax(logits))
    candidates, probs = distribution(logits, row)
    cdf = np.cumsum(probs, dtype=np.float64)
    pick = int(np.searchsorted(cdf, row.rng.random() * cdf[-1], side="right"))
    return int(candidates[min(pick, len(candidates) - 1)])


def distribution(logits: np.ndarray, row: RowSampler) -> tuple[np.ndarray, np.ndarray]:
    """The row's sampling distribution over its candidates after temperature, top-k, top-p and min-p (logits
    already biased and penalised): (token ids, probabilities)."""
    p = row.params
    scaled = logits / np.float32(p.temperature)
    candidates, probs = _top_k(scaled, p.top_k)
    if p.top_p < 1.0:
        candidates, probs = _top_p(candidates, probs, p.top_p)
    if p.min_p > 0.0:
        keep = probs >= p.min_p * probs.max()
        candidates, probs = candidates[keep], probs[keep]
    return candidates, probs


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _logsumexp(x: np.ndarray) -> float:
    m = x.max()
    return float(m + np.log(np.exp(x - m).sum()))


def _top_k(scaled: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (token ids) and their probabilities after top-k."""
    if 0 < k < scaled.shape[0]:
        idx = np.argpartition(-scaled, k - 1)[:k]
        return idx, _softmax(scaled[idx])
    return np.arange(scaled.shape[0]), _softmax(scaled)


def _top_p(candidates: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Smallest set of most likely candidates whose mass reaches top_p.

    The nucleus lies inside any top-n window whose mass already reaches
    top_p, so grow the window until it does instead of sorting everything.
    """
    n = min(_TOP_P_FIRST_WINDOW, len(probs))
    while True:
        if n < len(probs):
            window = np.argpartition(-probs, n - 1)[:n]
        else:
            window = np.arange(len(probs))
        if n == len(probs) or probs[window].sum() >= top_p:
            break
        n = min(n * 8, len(probs))
    order = window[np.argsort(-probs[window], kind="stable")]
    cum = np.cumsum(probs[order])
    # Keep every token whose preceding mass is still below top_p.
    cut = int(np.searchsorted(cum, top_p, side="left")) + 1
    keep = order[: min(cut, len(order))]
    return candidates[keep], probs[keep]
