"""Sampling filters against hand-computed cases, seeds, and parameter validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamgen.engine.params import SamplingParams
from streamgen.engine.sampling import RowSampler, sample
from streamgen.errors import ValidationError

V = 8


def _logits_for(probs: list[float]) -> np.ndarray:
    return np.log(np.array(probs, dtype=np.float32))[None, :]


def _support(params: SamplingParams, probs: list[float], draws: int = 400) -> dict[int, float]:
    """Empirical distribution of sampled ids."""
    row = RowSampler(params, len(probs), [], seed=123)
    logits = _logits_for(probs)
    counts: dict[int, int] = {}
    for _ in range(draws):
        t = int(sample(logits, [row]).token_ids[0])
        counts[t] = counts.get(t, 0) + 1
    return {k: v / draws for k, v in sorted(counts.items())}


PROBS = [0.05, 0.40, 0.02, 0.25, 0.15, 0.08, 0.03, 0.02]  # sorted ids by prob: 1, 3, 4, 5, 0, 6, 2/7


def test_greedy_picks_argmax() -> None:
    row = RowSampler(SamplingParams(temperature=0.0), V, [], seed=0)
    assert sample(_logits_for(PROBS), [row]).token_ids.tolist() == [1]


def test_top_k_keeps_exactly_k_most_likely() -> None:
    dist = _support(SamplingParams(temperature=1.0, top_k=3, top_p=1.0), PROBS)
    assert set(dist) == {1, 3, 4}
    # renormalised 0.40/0.80 = 0.5
    assert dist[1] == pytest.approx(0.5, abs=0.08)


def test_top_p_keeps_smallest_set_reaching_mass() -> None:
    # cumulative: 0.40, 0.65, 0.80 -> top_p 0.7 needs {1, 3, 4}
    assert set(_support(SamplingParams(temperature=1.0, top_p=0.7), PROBS)) == {1, 3, 4}
    assert set(_support(SamplingParams(temperature=1.0, top_p=0.6), PROBS)) == {1, 3}
    assert set(_support(SamplingParams(temperature=1.0, top_p=0.3), PROBS)) == {1}


def test_top_p_over_a_large_vocabulary_matches_a_full_sort() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=49152).astype(np.float32) * 3
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.9)) + 1].tolist())
    row = RowSampler(SamplingParams(temperature=1.0, top_p=0.9), len(logits), [], seed=5)
    picks = {int(sample(logits[None, :], [row]).token_ids[0]) for _ in range(300)}
    assert picks <= nucleus
    assert len(nucleus) > 64, "the case must be wider than the first argpartition window"


def test_min_p_drops_tokens_below_fraction_of_top() -> None:
    # 0.4 * 0.3 = 0.12 -> keeps 0.40, 0.25, 0.15
    assert set(_support(SamplingParams(temperature=1.0, min_p=0.3, top_p=1.0), PROBS)) == {1, 3, 4}


def test_temperature_sharpens_and_flattens() -> None:
    sharp = _support(SamplingParams(temperature=0.2, top_p=1.0), PROBS)  # top-p off: the default is 0.5
    flat = _support(SamplingParams(temperature=5.0, top_p=1.0), PROBS)
    assert sharp.get(1, 0) > 0.85
    assert flat.get(1, 0) < 0.3 and len(flat) >= 6


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    params = SamplingParams(repetition_penalty=2.0)
    row = RowSampler(params, 4, prompt_ids=[0, 1], seed=0)
    out = row.apply_penalties(np.array([2.0, -1.0, 2.0, -1.0], dtype=np.float32))
    np.testing.assert_allclose(out, [1.0, -2.0, 2.0, -1.0])


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    row = RowSampler(params, 3, prompt_ids=[2], seed=0)
    row.observe(0)
    row.observe(0)
    row.observe(1)
    out = row.apply_penalties(np.zeros(3, dtype=np.float32))
    # token 0: 0.5 + 2 * 0.25; token 1: 0.5 + 0.25; token 2 only in the prompt: untouched
    np.testing.assert_allclose(out, [-1.0, -0.75, 0.0])


def test_same_seed_same_tokens_different_seed_differs() -> None:
    logits = np.random.default_rng(1).normal(size=(1, 1000)).astype(np.float32)
    params = SamplingParams(temperature=1.0)

    def draw(seed: int) -> list[int]:
        row = RowSampler(params, 1000, [], seed)
        return [int(sample(logits, [row]).token_ids[0]) for _ in range(20)]

    assert draw(42) == draw(42)
    assert draw(42) != draw(43)


def test_logprob_is_under_the_raw_model_distribution() -> None:
    row = RowSampler(SamplingParams(temperature=0.0, logprobs=True), V, [], seed=0)
    out = sample(_logits_for(PROBS), [row])
    assert out.logprobs[0] == pytest.approx(math.log(0.40), abs=1e-5)


def test_top_logprobs_are_the_most_likely_tokens_in_order() -> None:
    row = RowSampler(SamplingParams(temperature=0.0, logprobs=True, top_logprobs=3), V, [], seed=0)
    out = sample(_logits_for(PROBS), [row])
    ranked = sorted(range(len(PROBS)), key=lambda t: -PROBS[t])[:3]
    assert [t for t, _ in out.top_logprobs[0]] == ranked
    assert [lp for _, lp in out.top_logprobs[0]] == pytest.approx([math.log(PROBS[t]) for t in ranked], abs=1e-5)
    assert sample(_logits_for(PROBS), [RowSampler(SamplingParams(logprobs=True), V, [], 0)]).top_logprobs == [None]


def test_logit_bias_moves_a_token_and_a_ban_removes_it() -> None:
    logits = _logits_for(PROBS)
    favourite = int(np.argmax(logits[0]))
    banned = RowSampler(SamplingParams(temperature=0.0, logit_bias=((favourite, -100.0),)), V, [], 0)
    assert int(sample(logits, [banned]).token_ids[0]) != favourite
    pushed = RowSampler(SamplingParams(temperature=0.0, logit_bias=((0, 100.0),)), V, [], 0)
    assert int(sample(logits, [pushed]).token_ids[0]) == 0
    assert SamplingParams.from_mapping({"logit_bias": {"7": -100, 3: 5}}).logit_bias == ((3, 5.0), (7, -100.0))


def test_rows_keep_their_own_parameters() -> None:
    logits = np.repeat(_logits_for(PROBS), 2, axis=0)
    rows = [RowSampler(SamplingParams(temperature=0.0), V, [], 0), RowSampler(SamplingParams(top_k=1, temperature=1.0, repetition_penalty=100.0), V, [1], 0)]
    # Row 1's penalty pushes token 1 down, so its top-1 is token 3; row 0 is untouched.
    assert sample(logits, rows).token_ids.tolist() == [1, 3]


@pytest.mark.parametrize(
    ("raw", "param", "fragment"),
    [
        ({"temperature": -0.1}, "temperature", "must be in [0, 10]"),
        ({"temperature": float("nan")}, "temperature", "must be in"),
        ({"temperature": "hot"}, "temperature", "must be a number, got str"),
        ({"top_p": 0}, "top_p", "must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p", "got 1.5"),
        ({"top_k": 2.5}, "top_k", "must be an integer"),
        ({"top_k": True}, "top_k", "must be an integer, got bool"),
        ({"max_tokens": 0}, "max_tokens", "must be in [1,"),
        ({"stop": [""]}, "stop", "non-empty strings"),
        ({"stop": ["x"] * 17}, "stop", "at most 16"),
        ({"seed": -1}, "seed", "must be in [0,"),
        ({"logprobs": "yes"}, "logprobs", "true or false"),
        ({"presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
        ({"temprature": 1}, "temprature", "unknown parameter 'temprature'"),
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs", "[0, 20]"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "keys must be token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
        ({"logit_bias": [1]}, "logit_bias", "must be an object"),
    ],
)
def test_invalid_parameters_are_rejected_with_what_is_allowed(raw: dict, param: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as err:
        SamplingParams.from_mapping(raw)
    assert err.value.param == param
    assert fragment in err.value.message


def test_valid_parameters_round_trip() -> None:
    p = SamplingParams.from_mapping({"temperature": 0, "top_k": 5, "stop": "END", "seed": 3, "logprobs": True})
    assert p.greedy and p.top_k == 5 and p.stop == ("END",) and p.seed == 3 and p.logprobs
