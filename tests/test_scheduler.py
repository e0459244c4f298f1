"""Scheduler and step loop driven by a fake model: no ONNX, no weights.

The fake runner's logits always point at (previous token + 1) mod V, so every
output is predictable, and it records what each forward pass contained.
"""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from streamgen.engine.core import EngineCore
from streamgen.engine.costs import OnlineLine, StepCosts
from streamgen.engine.params import SamplingParams
from streamgen.engine.scheduler import shared_passes
from streamgen.engine.request import FinishEvent, GenerationRequest, TokenEvent
from streamgen.model_files import ModelInfo
from streamgen.engine.scheduler import PROMPT_FLOOR_SHARE, QueueFull, Scheduler, SchedulerLimits
from streamgen.engine.sequence import Sequence, SeqStatus
from streamgen.engine.slot_table import SlotTable
from streamgen.engine.tokenizer import TextTokenizer

V = 50


def _tokenizer() -> TextTokenizer:
    vocab = {f"w{i}": i for i in range(V)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return TextTokenizer(tok, None, frozenset())


class FakeRunner:
    """KV slots without a model: next token = last token + 1. The slot table is the real one."""

    supports_reuse = True

    def __init__(self, max_slots: int, context: int = 64, prompt_pass_tokens: int = 0) -> None:
        self.prompt_pass_tokens = prompt_pass_tokens
        self.max_slots = max_slots
        self.info = ModelInfo(num_layers=1, num_kv_heads=1, head_dim=16, vocab_size=V, context_length=context)
        self.table = SlotTable(max_slots, context)
        self.calls: list[tuple[str, list[int], int]] = []  # (kind, slots, tokens)

    def _logits(self, token: int) -> np.ndarray:
        row = np.zeros(V, dtype=np.float32)
        row[(token + 1) % V] = 10.0
        return row

    def prefill(self, slot, token_ids):
        self.calls.append(("prefill", [slot], len(token_ids)))
        self.table.append(slot, token_ids)
        return self._logits(token_ids[-1])

    def prefill_fresh(self, slots, prompts):
        self.calls.append(("shared", list(slots), sum(len(p) for p in prompts)))
        for slot, prompt in zip(slots, prompts):
            self.table.append(slot, prompt)
        return np.stack([self._logits(p[-1]) for p in prompts])

    def decode(self, slots, token_ids):
        self.calls.append(("decode", list(slots), len(slots)))
        for s, t in zip(slots, token_ids):
            self.table.append(s, [t])
        return np.stack([self._logits(t) for t in token_ids])

    def copy_prefix(self, src, dst, end):
        start = int(self.table.lengths[dst])
        self.calls.append(("copy", [src, dst], end - start))
        self.table.append(dst, self.table.tokens[src, start:end].copy())


def _request(prompt_len: int, max_tokens: int = 5, first: int = 1) -> GenerationRequest:
    prompt = tuple((first + i) % V for i in range(prompt_len))
    return GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), frozenset())


def _core(slots: int = 2, waiting: int = 8, budget: int = 64, chunk: int = 16,
          prefix_cache: bool = False, prompt_pass_tokens: int = 0) -> tuple[EngineCore, FakeRunner]:
    """Most tests here give every request the same prompt; the prefix cache is off unless a test is about it."""
    runner = FakeRunner(slots, prompt_pass_tokens=prompt_pass_tokens)
    limits = SchedulerLimits(max_waiting=waiting, token_budget=budget, prefill_chunk=chunk)
    # The fake's microsecond steps would teach the online costs nothing a real model does: keep the priors.
    priors = StepCosts()
    costs = StepCosts(*(OnlineLine(line.intercept, line.slope, frozen=True)
                        for line in (priors.decode, priors.prefill, priors.copy)))
    return EngineCore(runner, _tokenizer(), limits, prefix_cache=prefix_cache, costs=costs), runner


def _run(core: EngineCore) -> list:
    events = []
    while core.has_work:
        events += core.step()
    return events


def test_admission_is_first_come_first_served() -> None:
    core, runner = _core(slots=2)
    seqs = [core.add(_request(3, max_tokens=2 + i), key=i) for i in range(5)]
    core.step()
    assert [s.status for s in seqs] == [SeqStatus.DECODING] * 2 + [SeqStatus.WAITING] * 3
    finished_order = [e.key for e in _run(core) if isinstance(e, FinishEvent)]
    assert finished_order == [0, 1, 2, 3, 4]
    # each got the predictable continuation of its prompt
    assert all(s.output_ids == [(s.request.prompt_ids[-1] + 1 + k) % V for k in range(s.max_tokens)] for s in seqs)


def test_token_budget_bounds_prefill_and_chunks_long_prompts() -> None:
    core, runner = _core(slots=4, budget=10, chunk=4)
    decoding = [core.add(_request(2, max_tokens=50), key=i) for i in range(3)]
    core.step()  # admits and prefills the three short prompts
    assert all(s.status == SeqStatus.DECODING for s in decoding)
    long = core.add(_request(20, max_tokens=3), key=9)
    runner.calls.clear()
    core.step()
    prefilled = sum(n for kind, _, n in runner.calls if kind == "prefill")
    decoded = sum(n for kind, _, n in runner.calls if kind == "decode")
    assert decoded == 3, "running sequences keep decoding while a long prompt comes in"
    assert prefilled == 4 and prefilled + decoded <= 10, "one chunk within the budget"
    steps = 1
    while long.status != SeqStatus.DECODING:
        core.step()
        steps += 1
    assert steps == 5, "20 prompt tokens in chunks of 4"


def test_a_full_queue_refuses_at_once() -> None:
    scheduler = Scheduler(SchedulerLimits(max_waiting=2))
    tok = _tokenizer()
    for i in range(2):
        scheduler.add(Sequence(i, _request(3), tok, 64))
    with pytest.raises(QueueFull):
        scheduler.add(Sequence(3, _request(3), tok, 64))


def test_cancel_removes_the_row_before_the_next_forward_pass() -> None:
    core, runner = _core(slots=3)
    seqs = [core.add(_request(2, max_tokens=30), key=i) for i in range(3)]
    core.step()
    core.step()
    events = core.cancel(seqs[1])
    assert len(events) == 1 and events[0].finish_reason == "cancelled"
    assert runner.table.free_count == 1, "its slot is free at once"
    runner.calls.clear()
    core.step()
    assert runner.calls == [("decode", [seqs[0].slot, seqs[2].slot], 2)]
    assert core.cancel(seqs[1]) == [], "cancelling twice does nothing"


def test_a_waiting_request_cancelled_never_runs() -> None:
    core, runner = _core(slots=1)
    first = core.add(_request(2, max_tokens=3), key=0)
    second = core.add(_request(2, max_tokens=3), key=1)
    core.step()
    (event,) = core.cancel(second)
    assert event.usage.completion_tokens == 0
    _run(core)
    assert [c for c in runner.calls if c[0] == "prefill"] == [("prefill", [0], 2)], "only the first was prefilled"
    assert first.finish_reason == "length"


def test_slots_are_returned_and_reused() -> None:
    core, runner = _core(slots=2)
    for i in range(6):
        core.add(_request(2 + i, max_tokens=1 + i % 3), key=i)
    events = _run(core)
    assert runner.table.free_count == 2
    assert sum(isinstance(e, FinishEvent) for e in events) == 6
    used = {slots[0] for kind, slots, _ in runner.calls if kind == "prefill"}
    assert used == {0, 1}


def test_exactly_one_final_event_per_request() -> None:
    core, _ = _core(slots=3, budget=8, chunk=3)
    rng = np.random.default_rng(0)
    seqs = [core.add(_request(int(rng.integers(1, 12)), max_tokens=int(rng.integers(1, 9))), key=i) for i in range(8)]
    events = _run(core)
    finals = [e.key for e in events if isinstance(e, FinishEvent)]
    assert sorted(finals) == list(range(8))
    for s in seqs:
        tokens = [e for e in events if isinstance(e, TokenEvent) and e.key == s.key]
        assert [t.index for t in tokens] == list(range(s.max_tokens))


# ---- prefix cache ---------------------------------------------------------------------


def _prefilled(runner: FakeRunner) -> int:
    return sum(n for kind, _, n in runner.calls if kind == "prefill")


def test_a_released_slot_keeps_its_tokens_and_the_next_turn_prefills_only_the_rest() -> None:
    core, runner = _core(slots=2, prefix_cache=True)
    first = core.add(_request(40, max_tokens=5), key=0)
    _run(core)
    held = list(first.request.prompt_ids) + first.output_ids[:-1]  # the last sampled token was never fed
    assert runner.table.tokens[first_slot(runner), : runner.table.lengths[0]].tolist() == held
    # The next turn: everything the slot holds, then new tokens.
    follow = GenerationRequest(tuple(held) + (7, 8, 9), SamplingParams(temperature=0.0, max_tokens=3), frozenset())
    runner.calls.clear()
    second = core.add(follow, key=1)
    (final,) = [e for e in _run(core) if isinstance(e, FinishEvent)]
    assert second.slot is None and final.usage.cached_tokens == len(held)
    assert _prefilled(runner) == 3 and final.timings.prefill_tokens == 3
    assert second.output_ids == [10, 11, 12]


def first_slot(runner: FakeRunner) -> int:
    return int(np.flatnonzero(runner.table.lengths)[0])


def test_an_identical_prompt_still_runs_two_tokens() -> None:
    core, runner = _core(slots=1, prefix_cache=True)
    request = _request(20, max_tokens=2)
    core.add(request, key=0)
    _run(core)
    runner.calls.clear()
    core.add(request, key=1)
    (final,) = [e for e in _run(core) if isinstance(e, FinishEvent)]
    assert final.usage.cached_tokens == 18 and _prefilled(runner) == 2


def test_requests_sharing_a_long_prompt_prefill_it_once_and_copy_it() -> None:
    core, runner = _core(slots=4, budget=64, chunk=16, prefix_cache=True)
    system = tuple(range(1, 41))  # 40 shared tokens
    seqs = [core.add(GenerationRequest(system + (41 + i, 45 + i), SamplingParams(temperature=0.0, max_tokens=2),
                                       frozenset()), key=i) for i in range(4)]
    events = _run(core)
    assert _prefilled(runner) == 40 + 4 * 2, "the shared part once, each request's own tokens once"
    finals = {e.key: e for e in events if isinstance(e, FinishEvent)}
    assert [finals[i].usage.cached_tokens for i in range(1, 4)] == [40, 40, 40]
    assert all(s.output_ids == [(s.request.prompt_ids[-1] + 1 + k) % V for k in range(2)] for s in seqs)


def test_prefixes_are_reused_only_within_a_namespace() -> None:
    core, runner = _core(slots=2, prefix_cache=True)
    prompt = tuple(range(1, 41))
    core.add(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=2), frozenset(), namespace="a"), 0)
    _run(core)
    other = core.add(GenerationRequest(prompt, SamplingParams(temperature=0.0, max_tokens=2), frozenset(),
                                       namespace="b"), 1)
    (final,) = [e for e in _run(core) if isinstance(e, FinishEvent)]
    assert final.usage.cached_tokens == 0 and other.output_ids == [41, 42]


def test_with_the_prefix_cache_off_nothing_is_kept_or_copied() -> None:
    core, runner = _core(slots=2, prefix_cache=False)
    request = _request(30, max_tokens=2)
    core.add(request, key=0)
    core.add(request, key=1)
    _run(core)
    core.add(request, key=2)
    finals = [e for e in _run(core) if isinstance(e, FinishEvent)]
    assert finals[0].usage.cached_tokens == 0
    assert _prefilled(runner) == 90 and not any(kind == "copy" for kind, _, _ in runner.calls)
    assert runner.table.lengths.tolist() == [0, 0]


def test_no_prompt_chunk_is_a_single_token_on_top_of_a_cache() -> None:
    """A one-token pass on top of a past rounds differently from a longer one (engine/slot_table.py)."""
    core, runner = _core(slots=3, budget=5, chunk=4, prefix_cache=True)
    rng = np.random.default_rng(3)
    for i in range(12):
        core.add(_request(int(rng.integers(2, 30)), max_tokens=int(rng.integers(1, 6)), first=int(rng.integers(V))), i)
        core.step()
    _run(core)
    assert all(n >= 2 for kind, _, n in runner.calls if kind == "prefill")


# ---- what each request cost -------------------------------------------------------------


def test_step_time_is_split_by_tokens_run_and_a_request_alone_pays_the_whole_step(monkeypatch) -> None:
    import streamgen.engine.core as core_module

    clock = iter(range(0, 10_000, 1))  # hand-set step times: every clock read advances one second
    monkeypatch.setattr(core_module.time, "perf_counter", lambda: float(next(clock)))
    core, runner = _core(slots=2, budget=64, chunk=16)
    steps: list[float] = []
    core.on_step = lambda seconds, n: steps.append(seconds)
    alone = core.add(_request(6, max_tokens=3), key=0)
    events = _run(core)
    final = next(e for e in events if isinstance(e, FinishEvent))
    assert final.usage.compute_s == pytest.approx(sum(steps)), "alone, a request pays every step it was in"
    assert core.busy_s == pytest.approx(sum(steps))
    assert final.usage.cost_usd(3.6) == pytest.approx(final.usage.compute_s / 1000)

    steps.clear()
    a = core.add(_request(10, max_tokens=2, first=1), key=1)
    b = core.add(_request(4, max_tokens=2, first=20), key=2)
    events = _run(core)
    finals = {e.key: e for e in events if isinstance(e, FinishEvent)}
    # The first step ran a's 10 prompt tokens and b's 4: a paid 10/14 of it, b 4/14; then one token each.
    assert finals[1].usage.compute_s + finals[2].usage.compute_s == pytest.approx(sum(steps))
    assert finals[1].usage.compute_s == pytest.approx(steps[0] * 10 / 14 + sum(steps[1:]) / 2)
    assert alone.compute_s > 0 and a.compute_s > b.compute_s


# ---- inter-token latency target -----------------------------------------------------------


def _costed_core(target_ms: float | None, slots: int = 4) -> tuple[EngineCore, FakeRunner, StepCosts]:
    """Hand-set step costs that the fake runner's speed cannot move: 10 ms + 2 ms a row to decode,
    1 ms + 0.5 ms a prompt token to prefill."""
    costs = StepCosts(decode=OnlineLine(10.0, 2.0, frozen=True), prefill=OnlineLine(1.0, 0.5, frozen=True))
    runner = FakeRunner(slots, context=400)
    limits = SchedulerLimits(max_waiting=32, token_budget=256, prefill_chunk=128, itl_target_ms=target_ms)
    return EngineCore(runner, _tokenizer(), limits, costs=costs), runner, costs


def _predicted_step_ms(plan_calls: list, costs: StepCosts) -> float:
    decode = [c for c in plan_calls if c[0] == "decode"]
    prefill = [c for c in plan_calls if c[0] == "prefill"]
    ms = costs.decode(max(decode[0][1]) + 1) if decode else 0.0
    return ms + sum(costs.prefill(n) for _, _, n in prefill)


def test_a_decoding_step_holds_the_latency_target_and_long_prompts_still_finish() -> None:
    core, runner, costs = _costed_core(target_ms=40.0)
    # Three streams decode while long prompts keep arriving.
    streams = [core.add(_request(4, max_tokens=60, first=10 * i), key=i) for i in range(3)]
    core.step()
    longs = [core.add(_request(120, max_tokens=2, first=5 + i), key=10 + i) for i in range(3)]
    worst, steps = 0.0, 0
    while core.has_work:
        runner.calls.clear()
        core.step()
        steps += 1
        if any(kind == "decode" for kind, _, _ in runner.calls):
            worst = max(worst, _predicted_step_ms(runner.calls, costs))
    assert worst <= 40.0 + 1e-9, f"a decoding step was planned at {worst} ms against a 40 ms target"
    assert all(s.finish_reason == "length" for s in streams + longs), "every request finished: none starved"
    assert steps < 400


def test_each_prompt_chunk_pays_its_own_pass_within_the_target() -> None:
    """Chunks of two prompts are two forward passes: the second fits only what the first left, fixed cost
    included (a prompt pass costs 10 ms before its tokens here, as reading the weights does on a CPU)."""
    costs = StepCosts(decode=OnlineLine(10.0, 2.0, frozen=True), prefill=OnlineLine(10.0, 0.5, frozen=True))
    runner = FakeRunner(6, context=400)
    limits = SchedulerLimits(max_waiting=32, token_budget=256, prefill_chunk=128, itl_target_ms=40.0)
    core = EngineCore(runner, _tokenizer(), limits, costs=costs)
    for i in range(3):
        core.add(_request(4, max_tokens=60, first=10 * i), key=i)
    core.step()  # three streams decode from here on: 16 ms a step
    core.add(_request(6, max_tokens=2, first=5), key=10)
    core.add(_request(120, max_tokens=2, first=6), key=11)
    worst = 0.0
    for _ in range(30):
        runner.calls.clear()
        core.step()
        prefill = [n for kind, _, n in runner.calls if kind == "prefill"]
        if len(prefill) == 2:
            # 24 ms spare: 6 tokens cost 13 ms, leaving 11 ms, which fits 2 tokens (11 ms) and not 28.
            assert prefill == [6, 2]
        worst = max(worst, _predicted_step_ms(runner.calls, costs))
    assert worst <= 40.0 + 1e-9

def test_without_a_target_or_without_decoding_streams_prompts_run_at_full_budget() -> None:
    core, runner, _ = _costed_core(target_ms=None)
    core.add(_request(4, max_tokens=30), key=0)
    core.step()
    core.add(_request(120, max_tokens=2, first=7), key=1)
    runner.calls.clear()
    core.step()
    assert sum(n for kind, _, n in runner.calls if kind == "prefill") == 120, "the whole prompt in one step"

    core, runner, _ = _costed_core(target_ms=40.0)
    core.add(_request(120, max_tokens=2, first=7), key=0)
    runner.calls.clear()
    core.step()
    assert sum(n for kind, _, n in runner.calls if kind == "prefill") == 120, "nothing decodes: no limit"


def test_a_target_below_the_decode_step_still_gives_prompts_a_share_of_the_step() -> None:
    core, runner, costs = _costed_core(target_ms=5.0)  # less than a decode step alone (12 ms at one row)
    core.add(_request(4, max_tokens=40), key=0)
    core.step()
    late = core.add(_request(30, max_tokens=1, first=9), key=1)
    runner.calls.clear()
    _run(core)
    assert late.finish_reason == "length"
    floor = costs.prompt_tokens_within(PROMPT_FLOOR_SHARE * costs.decode(1))  # (3 ms - 1) / 0.5 = 4 tokens
    assert floor == 4
    chunks = [n for kind, _, n in runner.calls if kind == "prefill"]
    assert sum(chunks) == 30
    assert chunks[:-1] == [floor] * (len(chunks) - 1), "a quarter of the decode step's time, every step"


# ---- prompts that share a forward pass ------------------------------------------------------------------------


def test_chunks_share_a_pass_while_padding_costs_less_than_a_pass_and_it_fits() -> None:
    # A pass costs 20 ms before its tokens and 2 ms a token: padding up to 9 tokens is worth sharing.
    assert shared_passes([14, 12, 13, 14], capacity=256, fixed_ms=20, per_token_ms=2) == [[0, 3, 2, 1]]
    assert shared_passes([30, 5, 28], capacity=256, fixed_ms=20, per_token_ms=2) == [[0, 2], [1]]
    # Rows x longest chunk within the capacity: 3 x 14 = 42 > 40.
    assert shared_passes([14, 14, 14], capacity=40, fixed_ms=20, per_token_ms=2) == [[0, 1], [2]]
    # With no fixed cost to save, only chunks of equal length share (no padding at all).
    assert shared_passes([6, 5, 6], capacity=256, fixed_ms=0.0, per_token_ms=2) == [[0, 2], [1]]
    # A single token always runs alone (GQA's decode path rounds differently from a prompt's).
    assert shared_passes([2, 1, 1], capacity=256, fixed_ms=20, per_token_ms=2) == [[0], [1], [2]]
    assert shared_passes([], capacity=256, fixed_ms=20, per_token_ms=2) == []


def _fixed_costs() -> StepCosts:
    return StepCosts(prefill=OnlineLine(intercept=20.0, slope=2.0, frozen=True))


def test_prompts_that_start_empty_rows_share_one_pass_and_the_others_run_alone() -> None:
    core, runner = _core(slots=4, budget=256, chunk=64, prefix_cache=True, prompt_pass_tokens=256)
    core.costs = _fixed_costs()
    system = tuple(range(1, 41))
    first = core.add(GenerationRequest(system + (50, 51), SamplingParams(temperature=0.0, max_tokens=2),
                                       frozenset()), key=0)
    _run(core)
    runner.calls.clear()
    # Three new prompts with nothing cached, and one that continues `first`'s cached prompt.
    fresh = [core.add(_request(10 + i, max_tokens=3, first=60 + 3 * i), key=1 + i) for i in range(3)]
    cached = core.add(GenerationRequest(system + (52, 53, 54), SamplingParams(temperature=0.0, max_tokens=3),
                                        frozenset()), key=9)
    core.step()
    (shared,) = [call for call in runner.calls if call[0] == "shared"]
    assert sorted(shared[1]) == sorted(s.slot for s in fresh) and shared[2] == 10 + 11 + 12
    assert [call for call in runner.calls if call[0] == "prefill"] == [("prefill", [cached.slot], 3)]
    assert all(s.status == SeqStatus.DECODING for s in [*fresh, cached])
    _run(core)
    assert all(s.output_ids == [(s.request.prompt_ids[-1] + 1 + k) % V for k in range(3)] for s in [*fresh, cached])


def test_without_shared_passes_every_prompt_runs_alone() -> None:
    core, runner = _core(slots=4, budget=256, chunk=64, prompt_pass_tokens=0)
    core.costs = _fixed_costs()
    for i in range(3):
        core.add(_request(10, max_tokens=2, first=1 + 20 * i), key=i)
    core.step()
    assert [kind for kind, _, _ in runner.calls] == ["prefill"] * 3


def test_a_short_cached_prefix_is_dropped_only_when_it_would_cost_a_shared_pass() -> None:
    core, runner = _core(slots=4, budget=256, chunk=64, prefix_cache=True, prompt_pass_tokens=256)
    core.add(_request(10, max_tokens=2, first=1), key=0)  # leaves w1..w10 (and its output) in a free row
    _run(core)
    # Two new prompts arrive together; one shares its first 3 tokens with that row. Keeping them would
    # save 3 x 1.8 ms and cost a 21.7 ms pass of its own: both run fresh, in one shared pass.
    runner.calls.clear()
    prompts = [(1, 2, 3, *range(40, 47)), tuple(range(60, 70))]
    together = [core.add(GenerationRequest(p, SamplingParams(temperature=0.0, max_tokens=2), frozenset()), key=1 + i)
                for i, p in enumerate(prompts)]
    core.step()
    assert [kind for kind, _, _ in runner.calls if kind != "decode"] == ["shared"]
    assert [s.cached_tokens for s in together] == [0, 0]
    _run(core)
    # Alone, the same kind of prompt keeps what the row holds: there is no pass to share.
    runner.calls.clear()
    alone = core.add(GenerationRequest((1, 2, 3, *range(80, 87)), SamplingParams(temperature=0.0, max_tokens=2),
                                       frozenset()), key=9)
    core.step()
    assert alone.cached_tokens == 3 and runner.calls[0] == ("prefill", [alone.slot], 7)


# ---- the plan itself: schedule() is pure, and says what the step will do ----------------------------------------


def _plan(core: EngineCore):
    return core.scheduler.schedule(core.runner.table, core.costs)


def test_schedule_changes_nothing_and_lists_claims_chunks_and_decode_rows() -> None:
    core, runner = _core(slots=2, budget=64, chunk=16)
    first = core.add(_request(3, max_tokens=5), key=0)
    core.step()  # first decodes from here on
    second, third = core.add(_request(20, max_tokens=2, first=9), key=1), core.add(_request(4, first=30), key=2)
    lengths, busy = runner.table.lengths.copy(), runner.table.busy.copy()
    plan = _plan(core)
    assert _plan(core) == plan, "planning twice plans the same step"
    assert np.array_equal(runner.table.lengths, lengths) and np.array_equal(runner.table.busy, busy)
    assert second.status == SeqStatus.WAITING and core.scheduler.waiting[0] is second, "nothing moved"
    # One free slot: the second request claims it, the third waits; the first decodes its last token.
    assert [(c.seq, c.slot, c.keep) for c in plan.claims] == [(second, 1, 0)]
    assert [(r.seq, r.slot, r.token) for r in plan.decode] == [(first, 0, first.output_ids[-1])]
    assert [(c.seq, c.start, c.tokens) for c in plan.chunks()] == [(second, 0, 16)], "one chunk of 16"
    assert third.status == SeqStatus.WAITING
    core.step()
    assert second.prefilled == 16 and second.slot == 1, "the step did what the plan said"


def test_a_plan_keeps_the_cached_prefix_and_copies_what_another_row_holds_further() -> None:
    core, runner = _core(slots=3, budget=64, chunk=64, prefix_cache=True)
    system = tuple(range(1, 41))
    core.add(GenerationRequest(system + (41, 42), SamplingParams(temperature=0.0, max_tokens=2), frozenset()), 0)
    _run(core)  # a free row now holds the system prompt and that turn
    follow = core.add(GenerationRequest(system + (43, 44, 45), SamplingParams(temperature=0.0, max_tokens=2),
                                        frozenset()), 1)
    plan = _plan(core)
    (claim,) = plan.claims
    assert claim.seq is follow and claim.keep == 40, "it takes the row holding its prefix and keeps 40 tokens"
    assert plan.copies == ()
    assert [(c.start, c.tokens) for c in plan.chunks()] == [(40, 3)], "only its own three tokens run"


def test_a_prompt_that_another_chunk_computes_this_step_waits_and_then_copies_it() -> None:
    core, runner = _core(slots=3, budget=128, chunk=64, prefix_cache=True)
    system = tuple(range(1, 41))
    a = core.add(GenerationRequest(system + (41, 42), SamplingParams(temperature=0.0, max_tokens=2), frozenset()), 0)
    b = core.add(GenerationRequest(system + (43, 44), SamplingParams(temperature=0.0, max_tokens=2), frozenset()), 1)
    plan = _plan(core)
    assert [c.seq for c in plan.claims] == [a, b]
    assert [c.seq for c in plan.chunks()] == [a], "b waits: a computes its first 40 tokens this step"
    core.step()
    plan = _plan(core)
    assert [(c.seq, c.source, c.start, c.upto) for c in plan.copies] == [(b, a.slot, 0, 40)]
    assert [(c.seq, c.start, c.tokens) for c in plan.chunks()] == [(b, 40, 2)]


def test_a_plan_groups_fresh_prompts_into_one_pass_and_prices_the_latency_target() -> None:
    core, runner = _core(slots=4, budget=256, chunk=64, prompt_pass_tokens=256)
    core.costs = _fixed_costs()
    seqs = [core.add(_request(10 + i, max_tokens=3, first=1 + 20 * i), key=i) for i in range(3)]
    (shared,) = _plan(core).passes
    assert [c.seq for c in shared.chunks] == seqs[::-1], "longest first, in one pass"
    assert shared.computed_tokens == 3 * 12, "padded to the longest"

    core, runner, costs = _costed_core(target_ms=20.0)
    core.add(_request(4, max_tokens=30), key=0)
    core.step()  # decoding one row costs 12 ms: 8 ms are left, and a pass costs 1 ms + 0.5 ms a token
    core.add(_request(100, max_tokens=2, first=7), key=1)
    (chunk,) = _plan(core).chunks()
    assert chunk.tokens == costs.prompt_tokens_within(20.0 - costs.decode(1)) == 14
