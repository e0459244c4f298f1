"""The plain-graph runner on the tiny model: its KV-cache loop must equal
recomputation, Optimum's own generate, and itself inside a batch. And the
generation loop over the default (GQA) build: batching, cancel, limits."""

from __future__ import annotations

import numpy as np
import pytest

from streamgen.engine.generate import generate
from streamgen.engine.loader import LoadedModel, load_model
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import FinishEvent, TokenEvent, prepare_request
from streamgen.engine.plain import PlainGraph

from conftest import CPU

STEPS = 24
PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of France. Berlin is",
    "Hello",
]


@pytest.fixture(scope="module")
def plain(tiny_plain_dir) -> PlainGraph:
    return PlainGraph(tiny_plain_dir, CPU)


def _ids(model: LoadedModel, text: str) -> list[int]:
    return model.tokenizer.encode(text)


def _cached_greedy(runner: PlainGraph, prompts: list[list[int]], steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    state, logits = runner.prefill(prompts)
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(logits)
        nxt = logits.argmax(axis=1)
        tokens.append(nxt)
        logits = runner.decode(state, nxt)
    return np.stack(tokens, axis=1), all_logits  # [B, steps]


def test_incremental_decoding_equals_full_recomputation(tiny_model: LoadedModel, plain: PlainGraph) -> None:
    prompt = _ids(tiny_model, PROMPTS[1])
    cached, cached_logits = _cached_greedy(plain, [prompt], STEPS)
    seq = list(prompt)
    for step in range(STEPS):
        # No cache at all: the whole sequence through a fresh prefill.
        _, logits = plain.prefill([seq])
        np.testing.assert_allclose(logits, cached_logits[step], rtol=1e-4, atol=1e-4)
        seq.append(int(logits.argmax()))
    assert seq[len(prompt):] == cached[0].tolist()


def test_greedy_equals_optimum_generate(tiny_plain_dir) -> None:
    torch = pytest.importorskip("torch")
    from optimum.onnxruntime import ORTModelForCausalLM

    model = load_model(tiny_plain_dir, CPU)
    prompt = _ids(model, PROMPTS[0])
    ref = ORTModelForCausalLM.from_pretrained(tiny_plain_dir, use_io_binding=True, provider="CPUExecutionProvider")
    ref.generation_config.eos_token_id = None  # generate exactly STEPS tokens, like ignore_eos
    out = ref.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=STEPS, do_sample=False, pad_token_id=0,
    )
    expected = out[0, len(prompt):].tolist()

    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    request = prepare_request(model.tokenizer, model.context_length, params, prompt=PROMPTS[0])
    ours = [e.token_id for e in generate(model.runner, model.tokenizer, [request]) if isinstance(e, TokenEvent)]
    assert ours == expected


def test_batch_rows_equal_solo_runs(tiny_model: LoadedModel, plain: PlainGraph) -> None:
    prompts = [_ids(tiny_model, p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length to exercise padding"
    batched, _ = _cached_greedy(plain, prompts, STEPS)
    for row, prompt in enumerate(prompts):
        solo, _ = _cached_greedy(plain, [prompt], STEPS)
        assert batched[row].tolist() == solo[0].tolist()


def test_generate_batch_gives_each_request_its_solo_output(tiny_model: LoadedModel) -> None:
    tok = tiny_model.tokenizer
    requests = [
        prepare_request(tok, tiny_model.context_length, SamplingParams(temperature=t, seed=7, max_tokens=n, ignore_eos=True), prompt=p)
        for p, t, n in zip(PROMPTS, (0.0, 0.9, 1.3), (5, 17, 11))
    ]

    def run(reqs):
        texts: dict[int, list[int]] = {}
        finals: dict[int, FinishEvent] = {}
        for e in generate(tiny_model.runner, tok, reqs):
            if isinstance(e, TokenEvent):
                texts.setdefault(e.key, []).append(e.token_id)
            else:
                assert e.key not in finals, "exactly one final event per request"
                finals[e.key] = e
        return texts, finals

    batch_tokens, batch_finals = run(requests)
    for row, req in enumerate(requests):
        solo_tokens, solo_finals = run([req])
        assert batch_tokens[row] == solo_tokens[0]
        assert batch_finals[row].text == solo_finals[0].text
        assert batch_finals[row].usage.completion_tokens == req.params.max_tokens
        assert batch_finals[row].finish_reason == "length"


def test_cancel_ends_within_one_step(tiny_model: LoadedModel) -> None:
    tok = tiny_model.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    reqs = [prepare_request(tok, tiny_model.context_length, params, prompt=p) for p in PROMPTS[:2]]
    seen = {0: 0, 1: 0}
    events = []
    for e in generate(tiny_model.runner, tok, reqs, is_cancelled=lambda row: row == 0 and seen[0] >= 3):
        events.append(e)
        if isinstance(e, TokenEvent):
            seen[e.key] += 1
    finals = {e.key: e for e in events if isinstance(e, FinishEvent)}
    assert finals[0].finish_reason == "cancelled" and finals[0].usage.completion_tokens == 3
    assert finals[1].finish_reason == "length" and finals[1].usage.completion_tokens == 50


def test_context_window_is_a_clear_error(tiny_model: LoadedModel) -> None:
    from streamgen.errors import ValidationError

    params = SamplingParams(max_tokens=tiny_model.context_length)
    with pytest.raises(ValidationError) as err:
        prepare_request(tiny_model.tokenizer, tiny_model.context_length, params, prompt="Hello world")
    assert err.value.code == "context_length_exceeded"
    assert "context window" in err.value.message
