"""Prompt-lookup speculation: proposals, acceptance (greedy, and the rejection rule that keeps sampling's
distribution), the decision at a request's claim, and the API's figures on the real model. Batch invariance
under churn, speculative requests included, is in tests/test_churn.py; a verification pass's logits against
the prompt path's in tests/test_slots.py."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import openai
import pytest
import websockets

from streamgen.engine.costs import OnlineLine, StepCosts
from streamgen.engine.params import SamplingParams, Speculation
from streamgen.engine.request import GenerationRequest
from streamgen.engine.sampling import RowSampler
from streamgen.engine.speculation import propose, verify
from streamgen.errors import ValidationError

from test_scheduler import _core

V = 50


def test_proposals_follow_the_latest_occurrence_of_the_longest_matching_tail() -> None:
    context = np.array([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 4, 5, 1, 2, 3], dtype=np.int32)
    assert propose(context, Speculation(4, 2, 4), limit=10) == [7, 8, 4, 5], "the latest [1, 2, 3], not the first"
    assert propose(context, Speculation(2, 2, 4), limit=10) == [7, 8], "at most max_draft"
    assert propose(context, Speculation(4, 2, 4), limit=1) == [7], "at most the room left"
    assert propose(np.array([1, 2, 3, 4], dtype=np.int32), Speculation(4, 2, 4), limit=10) == [], "no match"
    assert propose(np.array([5, 6, 5], dtype=np.int32), Speculation(4, 1, 2), limit=10) == [6, 5]


def _row(**params) -> RowSampler:
    return RowSampler(SamplingParams(**params), V, [], seed=7)


def _peaked(*tokens: int) -> np.ndarray:
    """Logits whose argmax at position i is tokens[i]."""
    logits = np.zeros((len(tokens), V), dtype=np.float32)
    logits[np.arange(len(tokens)), tokens] = 10.0
    return logits


def test_greedy_keeps_the_agreeing_proposals_and_one_token_more() -> None:
    kept = verify(_peaked(4, 5, 9, 1), [4, 5, 6], _row(temperature=0.0))
    assert kept.tokens == [4, 5, 9] and kept.accepted == 2, "two kept, then the model's own token at the third"
    whole = verify(_peaked(4, 5, 6, 1), [4, 5, 6], _row(temperature=0.0))
    assert whole.tokens == [4, 5, 6, 1] and whole.accepted == 3, "all kept, and the one after the last"
    penalized = verify(_peaked(4, 4, 4), [4, 4], _row(temperature=0.0, presence_penalty=2.0, logit_bias=((3, 9.0),)))
    assert penalized.tokens == [4, 3], "the second 4 is penalised as if the first had been generated"


def test_the_rejection_rule_keeps_the_sampling_distribution() -> None:
    """With a proposal, the first token of a verified step is distributed as a plain draw: p(proposal) kept,
    else a draw without it. Seeded: the same test, the same figures."""
    logits = np.log(np.array([[0.5, 0.3, 0.2] + [1e-9] * (V - 3)] * 2, dtype=np.float32))
    counts = np.zeros(V)
    for seed in range(4000):
        row = RowSampler(SamplingParams(temperature=1.0, top_p=1.0), V, [], seed=seed)
        counts[verify(logits, [1], row).tokens[0]] += 1
    assert np.allclose(counts[:3] / counts.sum(), [0.5, 0.3, 0.2], atol=0.03)


def test_a_request_speculates_only_when_a_verification_pass_pays_at_its_claim() -> None:
    costs = StepCosts(decode=OnlineLine(20.0, 4.0, frozen=True), prefill=OnlineLine(20.0, 2.0, frozen=True))

    def asks(i: int) -> GenerationRequest:
        return GenerationRequest(tuple(range(1 + i, 6 + i)), SamplingParams(temperature=0.0, max_tokens=20,
                                 speculation=Speculation(4, 1, 2)), frozenset())

    core, runner = _core(slots=8, budget=256)
    runner.supports_speculation = True
    core.scheduler.speculation = True
    core.costs = costs
    alone = core.add(asks(0), key=0)
    (claim,) = core.scheduler.schedule(runner.table, costs).claims
    # Alone: 3 tokens (TOKENS_PER_PASS) for a 30 ms pass against 1 token for a 24 ms decode share: it pays.
    assert claim.speculate and claim.seq is alone
    crowd = [core.add(asks(i), key=i) for i in range(1, 8)]
    claims = core.scheduler.schedule(runner.table, costs).claims
    # Eight arriving together will decode together: a row's share of a step is (20 + 4 x 8) / 8 = 6.5 ms, and
    # 3 tokens a pass no longer pay, for the first of the burst as much as for the last.
    assert {c.seq for c in claims} == {alone, *crowd} and not any(c.speculate for c in claims)
    # One more beside a single decoding row: a share of (20 + 4 x 2) / 2 = 14 ms, so a 30 ms pass pays.
    core2, runner2 = _core(slots=8, budget=256)
    runner2.supports_speculation = True
    core2.scheduler.speculation = True
    core2.costs = costs
    first = core2.add(asks(0), key=0)
    core2.step()
    second = core2.add(asks(1), key=1)
    (claim,) = core2.scheduler.schedule(runner2.table, costs).claims
    assert claim.seq is second and claim.speculate and first.status.name == "DECODING"
    # Alone now, but eight rows decoded together lately: it will most likely have them beside it again.
    costs.rows.value = 8.0
    (claim,) = core2.scheduler.schedule(runner2.table, costs).claims
    assert claim.seq is second and not claim.speculate


def test_speculation_is_validated() -> None:
    ok = SamplingParams.from_mapping({"speculation": {"type": "prompt_lookup", "max_draft": 5, "ngram": [1, 3]}})
    assert ok.speculation == Speculation(5, 1, 3)
    assert SamplingParams.from_mapping({"speculation": {"type": "off"}}).speculation.on is False
    for bad in ({"type": "medusa"}, {"type": "prompt_lookup", "max_draft": 99}, {"type": "prompt_lookup",
                                                                                  "ngram": [3, 1]}):
        with pytest.raises(ValidationError) as refused:
            SamplingParams.from_mapping({"speculation": bad})
        assert refused.value.param.startswith("speculation")


# ---- the real model, through a real server ----------------------------------------------------------------------

PARAGRAPH = ("The lighthouse keeper climbed the narrow stairs every evening at dusk. He lit the great lamp, wiped "
             "the salt from the glass, and watched the ships pass safely beyond the rocks.")
COPY = [{"role": "user", "content": f"Copy this paragraph exactly:\n\n{PARAGRAPH}"}]


def test_a_grounded_answer_keeps_proposals_and_reports_them_everywhere(real_server) -> None:
    spec = {"type": "prompt_lookup", "max_draft": 8, "ngram": [2, 4]}
    with openai.OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0) as sdk:
        with_spec = sdk.chat.completions.create(model="m", messages=COPY, max_tokens=60, temperature=0,
                                                extra_body={"speculation": spec})
        plain = sdk.chat.completions.create(model="m", messages=COPY, max_tokens=60, temperature=0,
                                            extra_body={"speculation": {"type": "off"}})
    details = with_spec.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0 and details.rejected_prediction_tokens >= 0
    assert plain.usage.completion_tokens_details is None, "a request that did not speculate reports nothing"

    async def ws() -> dict:
        async with websockets.connect(real_server.ws_url) as sock:
            await sock.send(json.dumps({"type": "generate", "id": "s", "messages": COPY, "params": {
                "max_tokens": 60, "temperature": 0, "speculation": spec}}))
            while (msg := json.loads(await sock.recv()))["type"] != "done":
                pass
            return msg

    done = asyncio.run(ws())
    assert done["text"] == with_spec.choices[0].message.content, "the same request, the same tokens"
    assert done["usage"]["accepted_tokens"] == details.accepted_prediction_tokens
    stats = httpx.get(real_server.url + "/v1/stats", timeout=5).json()["speculation"]
    assert stats["accepted_tokens"] >= 2 * details.accepted_prediction_tokens and 0 < stats["acceptance_rate"] <= 1


def test_bench_speculation_runs_end_to_end_and_reports_consistent_figures(tiny_hf_dir, tiny_model_dir, tiny_cache,
                                                                          tmp_path) -> None:
    """A smoke run on the tiny model (its 256-token context refuses the grounded prompts, so only the story
    runs): the report's rows, and ratios consistent with the figures they divide."""
    from streamgen.bench.speculation import WORKLOADS
    from streamgen.cli import main

    out = tmp_path / "speculation.json"
    assert main(["bench", "speculation", "--model", str(tiny_hf_dir), "--home", str(tiny_cache.home), "--quantize",
                 "none", "--levels", "1,2", "--rounds", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["llama_server"] is None
    assert [(r["concurrency"], r["workload"]) for r in report["rows"]] == [
        (level, w) for level in (1, 2) for w in [*WORKLOADS, "aggregate tok/s"]]
    for row in report["rows"]:
        on, off = row["streamgen, speculation on"], row["streamgen, speculation off"]
        if on and off:
            assert row["on / off"] == pytest.approx(on / off, abs=0.01)
    assert all(r["streamgen, speculation on"] > 0 for r in report["rows"] if r["workload"] == "aggregate tok/s")


def test_the_draft_budget_follows_the_sequences_own_passes() -> None:
    from streamgen.engine.speculation import DraftBudget

    budget = DraftBudget(Speculation(8, 2, 4))
    assert budget.allowed == 8
    budget.verified(8, 0)
    budget.verified(4, 1)
    assert budget.allowed == 4, "halved when none was kept; kept as is when some were"
    budget.verified(4, 4)
    assert budget.allowed == 8, "doubled, up to max_draft, when all were kept"
    for proposed in (8, 4, 2):
        budget.verified(proposed, 0)
    assert budget.allowed == 1
    budget.verified(1, 0)
    waits = 0
    while not budget.allowed:
        budget.decoded()
        waits += 1
    assert waits == DraftBudget.COOLDOWN, "a single proposal not kept: plain steps before the next"
