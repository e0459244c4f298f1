"""Batch invariance: a request gives the same tokens alone as when other
requests join and leave around it at random steps (tiny model, GQA slots)."""

from __future__ import annotations

import numpy as np
import pytest

from streamgen.engine.core import EngineCore
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import TokenEvent, prepare_request
from streamgen.engine.scheduler import SchedulerLimits
from streamgen.engine.slots import SlotConfig, SlotRunner

from conftest import CPU
from helpers import solo_tokens

POOL = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is",
    "Streaming generation sends each token as soon as it is sampled.",
    "Numbers: 0 1 2 3",
    "Hello world! How are you today? I am fine, thank you.",
    "Code:",
]
TARGET = "Paris is the capital of France. Berlin is the capital of"


@pytest.fixture(scope="module")
def runner(tiny_model_dir) -> SlotRunner:
    return SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=5, max_context=192, forward_tokens=4))


def _request(tok, ctx: int, text: str, **params):
    return prepare_request(tok, ctx, SamplingParams(ignore_eos=True, **params), prompt=text)


def _crowded(runner, tok, request, rng: np.random.Generator) -> tuple[list[int], int]:
    """Run `request` while others join, finish and get cancelled at random steps."""
    core = EngineCore(runner, tok, SchedulerLimits(max_waiting=64, token_budget=12,
                                                   prefill_chunk=4))
    target = core.add(request, key=0)
    others = []
    tokens: list[int] = []
    max_batch = 0
    key = 1
    while target.running:
        if rng.random() < 0.4:
            params = ({"temperature": 0.0} if rng.random() < 0.5
                      else {"temperature": float(rng.uniform(0.5, 1.5)), "seed": int(rng.integers(1000))})
            text = POOL[int(rng.integers(len(POOL)))] * int(rng.integers(1, 3))
            others.append(core.add(_request(tok, runner.info.context_length, text,
                                            max_tokens=int(rng.integers(1, 25)), **params), key=key))
            key += 1
        running = [s for s in others if s.running]
        if running and rng.random() < 0.15:
            core.cancel(running[int(rng.integers(len(running)))])
        max_batch = max(max_batch, sum(1 for s in core.scheduler.running if s.slot is not None))
        for event in core.step():
            if isinstance(event, TokenEvent) and event.key == 0:
                tokens.append(event.token_id)
    for s in others:  # leave the runner clean for the next schedule
        core.cancel(s)
    return tokens, max_batch


@pytest.mark.parametrize("schedule", [1, 2, 3])
@pytest.mark.parametrize("params", [{"temperature": 0.0},
                                    {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 1234,
                                     "repetition_penalty": 1.1}],
                         ids=["greedy", "seeded"])
def test_request_alone_equals_request_in_a_changing_batch(runner, tiny_model, schedule: int, params: dict) -> None:
    tok = tiny_model.tokenizer
    request = _request(tok, runner.info.context_length, TARGET, max_tokens=48, **params)
    alone = solo_tokens(runner, tok, request)
    crowded, max_batch = _crowded(runner, tok, request, np.random.default_rng(schedule))
    assert max_batch >= 3, "the schedule must actually crowd the request"
    assert crowded == alone
    assert runner.table.free_count == runner.max_slots, "every slot came back"


def test_a_failing_row_fails_alone_and_the_batch_goes_on(runner, tiny_model) -> None:
    from streamgen.engine.request import ErrorEvent, FinishEvent

    tok = tiny_model.tokenizer
    ctx = runner.info.context_length
    requests = [_request(tok, ctx, text, max_tokens=12, temperature=0.0) for text in POOL[:3]]
    solo = [solo_tokens(runner, tok, r) for r in requests]
    core = EngineCore(runner, tok, SchedulerLimits(max_waiting=8))
    seqs = [core.add(r, key=i) for i, r in enumerate(requests)]
    core.step()
    calls = {"n": 0}
    real_add = seqs[1].detok.add

    def broken_add(token_id):
        calls["n"] += 1
        if calls["n"] == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a detokenizer bug")
        return real_add(token_id)

    seqs[1].detok.add = broken_add
    events = []
    while core.has_work:
        events += core.step()
    finals = {e.key: e for e in events if isinstance(e, (FinishEvent, ErrorEvent))}
    assert isinstance(finals[1], ErrorEvent) and finals[1].code == "internal"
    assert "detokenizer" not in finals[1].message, "no internals in the client's message"
    assert [e.key for e in events if isinstance(e, (FinishEvent, ErrorEvent))].count(1) == 1
    for i in (0, 2):
        assert finals[i].finish_reason == "length"
        assert seqs[i].output_ids == solo[i]
    assert runner.table.free_count == runner.max_slots
