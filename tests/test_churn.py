"""Batch invariance under churn: random schedules, not orderly ones.

Hypothesis draws a schedule: requests arrive at random steps with random
prompts (many sharing a prefix, so the prefix cache keeps and copies rows),
random output lengths and sampling (greedy or seeded), some are cancelled,
and freed slots are taken again in whatever order the churn leaves them.
Every request that runs to its end must give exactly its solo tokens; a
cancelled one a prefix of them. Tiny model, GQA slots, prefix cache on; the
fp32 build, the fp16 build (what CUDA serves) and the int8-KV build.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis import event as note

from streamgen.engine.core import EngineCore
from streamgen.engine.costs import OnlineLine, StepCosts
from streamgen.engine.generate import generate
from streamgen.engine.grammar import ConstraintSpec
from streamgen.engine.params import SPECULATION_OFF, SamplingParams, Speculation
from streamgen.engine.request import FinishEvent, TokenEvent, prepare_request
from streamgen.engine.scheduler import SchedulerLimits
from streamgen.engine.slot_table import SlotTable
from streamgen.engine.slots import SlotConfig, SlotRunner

from conftest import CPU

# Shared openings (a system prompt, an earlier turn) and endings: prompts made
# of them share prefixes of many lengths.
OPENINGS = ["", "Paris is the capital of France. Berlin is the capital of Germany. ",
            "The quick brown fox jumps over the lazy dog. The quick brown fox"]
ENDINGS = ["Hello", " world! How are you today?", " Code: def f(x): return x * 2", " Numbers: 0 1 2 3 4 5",
           " Streaming generation sends each token"]
SLOTS, CONTEXT = 4, 160
# A request that asks for speculation gets it, whatever the load: its solo run is then the same kind of run.
SPECULATE = SchedulerLimits(max_waiting=10, speculation_policy="always")
# Constraints on the output (engine/grammar.py): requests held to them churn beside free ones.
CONSTRAINTS = [
    ConstraintSpec("json_schema", {"type": "object", "properties": {"n": {"type": "integer", "maximum": 999},
                                                                    "w": {"type": "string", "maxLength": 5}},
                                   "required": ["n", "w"], "additionalProperties": False}, "response_format"),
    ConstraintSpec("regex", "[a-z]{1,6}( [a-z]{1,6}){0,2}\\.", "structured_outputs.regex"),
    ConstraintSpec("choice", ("yes", "no", "not sure"), "structured_outputs.choice"),
]


@dataclass(frozen=True)
class Spec:
    opening: int
    endings: tuple[int, ...]
    max_tokens: int
    seed: int | None  # None: greedy
    constraint: int | None = None  # an index into CONSTRAINTS
    speculate: bool = False  # prompt-lookup speculation (engine/speculation.py)
    # A logit bias that makes the output repeat one token: the random tiny model's proposals are otherwise
    # never kept, and this way speculative passes keep several, some cut short by max_tokens.
    repeat: bool = False

    def text(self) -> str:
        return OPENINGS[self.opening] + "".join(ENDINGS[i] for i in self.endings)

    def params(self) -> SamplingParams:
        sampling = {"temperature": 0.0} if self.seed is None else {"temperature": 0.9, "top_p": 0.95, "seed": self.seed}
        speculation = Speculation(4, 1, 3) if self.speculate else SPECULATION_OFF
        bias = ((100, 100.0),) if self.repeat else ()
        return SamplingParams(max_tokens=self.max_tokens, ignore_eos=True, speculation=speculation, logit_bias=bias,
                              **sampling)

    def request(self, tok):
        constraint = None if self.constraint is None else CONSTRAINTS[self.constraint]
        return prepare_request(tok, CONTEXT, self.params(), prompt=self.text(), constraint=constraint)

    def valid(self, text: str) -> bool:
        """A whole constrained answer is what its constraint allows."""
        if self.constraint == 0:
            value = json.loads(text)
            return set(value) == {"n", "w"} and isinstance(value["n"], int) and len(value["w"]) <= 5
        if self.constraint == 1:
            return re.fullmatch(CONSTRAINTS[1].source, text) is not None
        return text in CONSTRAINTS[2].source


specs = st.builds(Spec, st.integers(0, len(OPENINGS) - 1),
                  st.lists(st.integers(0, len(ENDINGS) - 1), min_size=1, max_size=3).map(tuple),
                  st.integers(1, 16), st.one_of(st.none(), st.integers(0, 3)),
                  st.one_of(st.none(), st.none(), st.integers(0, len(CONSTRAINTS) - 1)), st.booleans(),
                  st.booleans())
# A schedule: per step, the requests that arrive and whether one running request is cancelled.
steps = st.lists(st.tuples(st.lists(specs, max_size=3), st.booleans(), st.integers(0, 7)), min_size=1, max_size=25)


@pytest.fixture()
def runner(tiny_build_dir) -> SlotRunner:
    """Every number format the slots hold: fp32, fp16, an int8 KV cache."""
    return SlotRunner(tiny_build_dir, CPU, SlotConfig(max_batch=SLOTS, max_context=CONTEXT, forward_tokens=24))


@pytest.fixture()
def solo(runner, tiny_model):
    """Each spec's tokens when it runs alone on an empty runner (memoized across examples)."""
    tok, done = tiny_model.tokenizer, {}

    def tokens(spec: Spec) -> tuple[list[int], FinishEvent]:
        if spec not in done:
            runner.table = SlotTable(SLOTS, CONTEXT)
            events = list(generate(runner, tok, [spec.request(tok)], limits=SPECULATE))
            done[spec] = ([e.token_id for e in events if isinstance(e, TokenEvent)], events[-1])
        return done[spec]

    return tokens


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=steps, budget=st.integers(4, 40), chunk=st.integers(1, 16),
       itl_target_ms=st.sampled_from([None, 0.5, 2.0, 10.0]))
def test_every_request_equals_its_solo_run_under_random_churn(runner, tiny_model, solo, schedule, budget,
                                                               chunk, itl_target_ms) -> None:
    tok = tiny_model.tokenizer
    # Solo runs first: they use the same runner, which the crowded run then starts afresh.
    specs_in_order = [spec for arrivals, _, _ in schedule for spec in arrivals]
    solos = [solo(spec) for spec in specs_in_order]
    expected = [tokens for tokens, _ in solos]
    runner.table = SlotTable(SLOTS, CONTEXT)
    # With a latency target the prompt work per step follows the measured step times (the tiny model's
    # steps take about a millisecond), so chunks are cut wherever the clock says: tokens must not change.
    limits = SchedulerLimits(max_waiting=100, token_budget=budget, prefill_chunk=chunk, itl_target_ms=itl_target_ms,
                             speculation_policy="always")
    core = EngineCore(runner, tok, limits, prefix_cache=True)
    seqs, got, cancelled, finals = {}, {}, set(), {}

    def run_step() -> None:
        for event in core.step():
            if isinstance(event, TokenEvent):
                got[event.key].append(event.token_id)
            else:
                assert event.key not in finals, "exactly one final event per request"
                finals[event.key] = event

    for arrivals, cancel, pick in schedule:
        for spec in arrivals:
            key = len(seqs)
            seqs[key], got[key] = core.add(spec.request(tok), key), []
        running = [k for k, s in seqs.items() if s.running]
        if cancel and running:
            victim = running[pick % len(running)]
            for event in core.cancel(seqs[victim]):
                finals[victim] = event
            cancelled.add(victim)
        if core.has_work:
            run_step()
    while core.has_work:
        run_step()

    assert set(finals) == set(seqs)
    for key, tokens in got.items():
        spec, (_, solo_final) = specs_in_order[key], solos[key]
        if key in cancelled:
            assert tokens == expected[key][: len(tokens)], f"request {key} (cancelled) diverged from its solo run"
            continue
        assert isinstance(finals[key], FinishEvent), f"request {key} failed: {finals[key]}"
        assert tokens == expected[key], f"request {key} diverged from its solo run"
        assert finals[key].finish_reason == solo_final.finish_reason
        if spec.constraint is None:
            assert finals[key].finish_reason == "length"
        elif finals[key].finish_reason == "stop":  # the grammar was complete: the answer is whole and valid
            assert spec.valid(finals[key].text), (spec, finals[key].text)
            note(f"a whole answer held to constraint {spec.constraint}")
    assert runner.table.free_count == SLOTS, "every slot came back"
    assert tok.grammars.live_matchers == 0, "every matcher was released, cancelled requests' included"
    for key, seq in seqs.items():
        if seq.speculative and seq.proposed:
            note("a speculative request verified proposals" + (" and kept some" if seq.accepted else ""))


def test_requests_arriving_together_share_a_prompt_pass_and_give_their_solo_tokens(runner, tiny_model, solo) -> None:
    """The orderly companion of the property above: with a pass's fixed cost set high, prompts that arrive
    together on empty rows run in one pass (the churn test reaches it only when the drawn schedule allows)."""
    tok = tiny_model.tokenizer
    # 7, 6, 8 and 9 tokens, longest first into passes of at most 24 tokens with padding: 9+8, then 7+6.
    specs = [Spec(0, (1,), 8, None), Spec(0, (4,), 8, 3), Spec(0, (0, 1), 8, None), Spec(0, (3,), 8, 1)]
    expected = [solo(spec)[0] for spec in specs]
    runner.table = SlotTable(SLOTS, CONTEXT)
    shared = []
    real = runner.prefill_fresh

    def spy(slots, prompts):
        shared.append(len(slots))
        return real(slots, prompts)

    runner.prefill_fresh = spy
    costs = StepCosts(prefill=OnlineLine(intercept=1000.0, slope=1.0, frozen=True))  # padding always pays
    core = EngineCore(runner, tok, SchedulerLimits(token_budget=200, prefill_chunk=64), costs=costs)
    seqs = [core.add(spec.request(tok), key) for key, spec in enumerate(specs)]
    while core.has_work:
        core.step()
    assert shared == [2, 2], "four prompts that start empty rows ran in two shared passes"
    assert [s.output_ids for s in seqs] == expected
