"""Static KV slots over the GroupQueryAttention graph, on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from streamgen.engine.generate import generate
from streamgen.engine.loader import load_model
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import FinishEvent, TokenEvent, prepare_request
from streamgen.engine.plain import PlainGraph
from streamgen.engine.slots import ContextFull, SlotConfig, SlotRunner
from streamgen.model_files import Manifest

from conftest import CPU
from helpers import greedy_slot

PROMPTS = ["The quick brown fox", "Paris is the capital of France. Berlin is", "Hello", "Code: def f(x): return"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_model(tiny_model_dir, CPU).tokenizer


@pytest.fixture()
def slots(tiny_model_dir) -> SlotRunner:
    return SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=4, max_context=128, forward_tokens=5))


def _greedy_plain(runner: PlainGraph, prompt: list[int], steps: int) -> list[int]:
    state, logits = runner.prefill([prompt])
    out = []
    for _ in range(steps):
        out.append(int(logits[0].argmax()))
        logits = runner.decode(state, np.array([out[-1]]))
    return out


def test_the_default_build_is_the_gqa_graph_without_concat(tiny_model_dir) -> None:
    import onnx

    assert Manifest.read(tiny_model_dir).graph == "gqa"
    ops = [n.op_type for n in onnx.load(str(tiny_model_dir / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "Concat" not in ops


def test_gqa_greedy_equals_the_plain_export_for_64_steps(tiny_plain_dir, tok, slots) -> None:
    plain = PlainGraph(tiny_plain_dir, CPU)
    for text in PROMPTS[:2]:
        prompt = tok.encode(text)
        slot = slots.allocate()
        assert greedy_slot(slots, slot, prompt, 64) == _greedy_plain(plain, prompt, 64)
        slots.free(slot)


def test_rows_of_different_lengths_decoded_together_give_their_solo_tokens(tok, slots) -> None:
    prompts = [tok.encode(t) for t in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)
    solo = []
    for p in prompts:
        s = slots.allocate()
        solo.append(greedy_slot(slots, s, p, 30))
        slots.free(s)
    taken = [slots.allocate() for _ in prompts]
    logits = np.stack([slots.prefill(s, p) for s, p in zip(taken, prompts)])  # one row at a time
    together = [[] for _ in prompts]
    for _ in range(30):
        picks = logits.argmax(axis=1)
        for out, t in zip(together, picks):
            out.append(int(t))
        logits = slots.decode(taken, picks.tolist())
    assert together == solo


def test_prefilling_a_row_leaves_the_other_rows_bit_identical(tok, slots) -> None:
    a, b = slots.allocate(), slots.allocate()
    slots.prefill(a, tok.encode(PROMPTS[1]))
    slots.decode([a], [5])
    before = [kv.numpy().copy() for kv in slots._kv]  # CPU OrtValues: numpy() views the buffer
    slots.prefill(b, tok.encode(PROMPTS[0]))
    after = [kv.numpy() for kv in slots._kv]
    for x, y in zip(before, after):
        assert x[a].tobytes() == y[a].tobytes(), "row a changed"
        assert x[b].tobytes() != y[b].tobytes(), "row b was written"


def test_a_reused_slot_gives_solo_tokens(tok, slots) -> None:
    prompt = tok.encode(PROMPTS[2])
    fresh = slots.allocate()
    expected = greedy_slot(slots, fresh, prompt, 20)
    slots.free(fresh)
    # Fill slot 0 with a long, different history, free it, then reuse it.
    s = slots.allocate()
    assert s == fresh
    greedy_slot(slots, s, tok.encode(PROMPTS[1] * 3), 40)
    slots.free(s)
    again = slots.allocate()
    assert again == fresh
    assert greedy_slot(slots, again, prompt, 20) == expected


def _rows(runner: SlotRunner, slot: int, upto: int) -> list[bytes]:
    """The K/V bytes of one row's first `upto` positions, every layer."""
    return [kv.numpy()[slot, :, :upto].tobytes() for kv in runner._kv]


@pytest.mark.parametrize("kind", ["free", "mid_prefill", "prefilled_this_step", "full"])
def test_decoding_other_rows_leaves_every_row_below_the_width_bit_identical(tiny_model_dir, tok, kind) -> None:
    """GQA writes one position in every row a decode step runs; the rows not decoding must only ever get
    that write at a position they will overwrite before reading it."""
    runner = SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=3, max_context=48, forward_tokens=8))
    prompt = tok.encode(PROMPTS[1])  # 10+ tokens
    subject = runner.allocate()
    assert subject == 0
    if kind == "mid_prefill":
        runner.prefill(subject, prompt[:5])
    elif kind == "full":
        runner.prefill(subject, (prompt * 10)[:48])
        runner.table.release(subject)
    else:
        runner.prefill(subject, prompt)
        if kind == "free":
            runner.table.release(subject)
    held = int(runner.table.lengths[subject])
    kept = held - 1 if kind == "full" else held  # only a full free row gives up a position (its last)
    before = _rows(runner, subject, kept)
    tokens_before = runner.table.tokens[subject, :kept].tolist()
    runner.table.claim(1)
    runner.table.claim(2)  # the decode runs rows 0..2
    logits = runner.prefill(2, tok.encode(PROMPTS[0]))
    for _ in range(3 if kind != "prefilled_this_step" else 1):
        logits = runner.decode([2], [int(logits.argmax())])[0]
    assert int(runner.table.lengths[subject]) == kept
    assert _rows(runner, subject, kept) == before
    assert runner.table.tokens[subject, :kept].tolist() == tokens_before


def test_the_three_line_reproduction_prefill_one_slot_decode_another(tiny_model_dir, tok) -> None:
    runner = SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=2, max_context=64))
    a, b = runner.allocate(), runner.allocate()
    runner.prefill(a, tok.encode(PROMPTS[0]))
    before = _rows(runner, a, 1)  # position 0, where a filler used to land
    runner.decode([b], [5])
    assert _rows(runner, a, 1) == before


def test_a_copied_prefix_decodes_like_its_source(tiny_model_dir, tok) -> None:
    runner = SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=3, max_context=96, forward_tokens=7))
    shared = tok.encode(PROMPTS[1])
    tail = tok.encode(" The quick brown fox")
    solo_slot = runner.allocate()
    solo = greedy_slot(runner, solo_slot, shared + tail, 20)
    runner.free(solo_slot)
    source, target = runner.allocate(), runner.allocate()
    runner.prefill(source, shared + tok.encode(" Hello"))  # holds the shared part, then diverges
    runner.copy_prefix(source, target, len(shared))
    assert _rows(runner, target, len(shared)) == _rows(runner, source, len(shared))
    assert runner.table.tokens[target, : len(shared)].tolist() == shared
    assert greedy_slot(runner, target, tail, 20) == solo
    with pytest.raises(ValueError, match="differ before position"):
        other = runner.allocate()
        runner.prefill(other, tail)
        runner.copy_prefix(source, other, len(shared))


def test_chunked_prefill_equals_one_pass(tiny_model_dir, tok) -> None:
    prompt = tok.encode(PROMPTS[1] * 2)
    whole = SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=1, max_context=128, forward_tokens=128))
    chunked = SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=1, max_context=128, forward_tokens=3))
    np.testing.assert_allclose(whole.prefill(whole.allocate(), prompt), chunked.prefill(chunked.allocate(), prompt),
                               rtol=1e-4, atol=1e-4)


def test_a_full_slot_ends_with_length_never_a_crash(tiny_model_dir, tok) -> None:
    runner = SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=2, max_context=32))
    prompt = tok.encode("Hello world")
    params = SamplingParams(temperature=0, ignore_eos=True)  # max_tokens: whatever the slot leaves
    req = prepare_request(tok, runner.info.context_length, params, prompt="Hello world")
    events = list(generate(runner, tok, [req]))
    final = events[-1]
    assert isinstance(final, FinishEvent) and final.finish_reason == "length"
    assert final.usage.completion_tokens == 32 - len(prompt)
    assert sum(isinstance(e, TokenEvent) for e in events) == 32 - len(prompt)
    with pytest.raises(ContextFull):
        slot = runner.allocate()
        runner.prefill(slot, list(range(1, 40)))


def test_memory_use_is_reported(tiny_model_dir) -> None:
    runner = SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=3, max_context=64))
    info = runner.info
    assert runner.kv_bytes == 3 * info.num_kv_heads * 64 * info.head_dim * 4 * 2 * info.num_layers


def test_prompts_run_together_in_one_pass_give_each_prompt_alone_bit_for_bit(tiny_build_dir, tok) -> None:
    """prefill_fresh (several empty rows' prompts in one pass, right-padded, through a scratch buffer) against
    each prompt prefilled alone: the same logits, the same K/V, the same tokens after; a busy row between
    them untouched. Every number format the slots hold."""
    prompts = [tok.encode(t) for t in (PROMPTS[1], PROMPTS[0], PROMPTS[3])]
    assert len({len(p) for p in prompts}) == 3, "different lengths: the shorter rows are padded"
    alone = SlotRunner(tiny_build_dir, CPU, SlotConfig(max_batch=4, max_context=96, forward_tokens=64))
    solo_logits, solo_rows, solo_tokens = [], [], []
    for prompt in prompts:
        slot = alone.allocate()
        solo_logits.append(alone.prefill(slot, prompt))
        solo_rows.append(_rows(alone, slot, len(prompt)))
        alone.free(slot)
        slot = alone.allocate()
        solo_tokens.append(greedy_slot(alone, slot, prompt, 12))
        alone.free(slot)

    runner = SlotRunner(tiny_build_dir, CPU, SlotConfig(max_batch=4, max_context=96, forward_tokens=64))
    slots = [runner.allocate() for _ in range(4)]
    busy, fresh = slots[1], [slots[3], slots[0], slots[2]]  # not contiguous, not in order
    greedy_slot(runner, busy, tok.encode(PROMPTS[2] + " and more"), 5)
    busy_before = _rows(runner, busy, int(runner.table.lengths[busy]))
    logits = runner.prefill_fresh(fresh, prompts)
    for row, (slot, prompt) in enumerate(zip(fresh, prompts)):
        assert np.array_equal(logits[row], solo_logits[row]), f"prompt {row}: logits differ from its solo prefill"
        assert _rows(runner, slot, len(prompt)) == solo_rows[row], f"prompt {row}: K/V differ"
        assert runner.table.tokens[slot, : len(prompt)].tolist() == prompt
    assert _rows(runner, busy, int(runner.table.lengths[busy])) == busy_before, "the busy row changed"
    tokens = [[int(row.argmax())] for row in logits]
    for _ in range(11):
        step = runner.decode(fresh, [t[-1] for t in tokens])
        for t, row in zip(tokens, step):
            t.append(int(row.argmax()))
    assert tokens == solo_tokens


def test_a_shared_prompt_pass_takes_only_empty_slots_within_its_capacity(tiny_model_dir, tok) -> None:
    runner = SlotRunner(tiny_model_dir, CPU, SlotConfig(max_batch=3, max_context=64, forward_tokens=8))
    a, b, c = runner.allocate(), runner.allocate(), runner.allocate()
    runner.prefill(a, [5, 6, 7])
    with pytest.raises(ValueError, match="empty slots"):
        runner.prefill_fresh([a, b], [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="at most 8 tokens"):
        runner.prefill_fresh([b, c], [[1, 2, 3, 4, 5], [3, 4]])  # 2 rows x 5 > 8
    with pytest.raises(ValueError, match="2 tokens or more"):
        runner.prefill_fresh([b, c], [[1], [3, 4]])
    assert runner.table.lengths[b] == runner.table.lengths[c] == 0, "a refused pass writes nothing"


def test_a_verification_pass_gives_each_position_what_the_prompt_path_gives_it_and_rejected_tail_is_dropped(
        tiny_build_dir, tok) -> None:
    """verify() runs the last token and proposals on top of a row's past in one pass: the logits after each
    are, bit for bit, what a prompt ending there gives (the multi-token path, however the prompt is cut), on
    every KV format. Truncating the rejected tail leaves the row decoding as if it had never held it."""
    runner = SlotRunner(tiny_build_dir, CPU, SlotConfig(max_batch=2, max_context=128, forward_tokens=32))
    prompt, tail = tok.encode(PROMPTS[1]), tok.encode(" Madrid is the capital of Spain.")[:5]
    slot = runner.allocate()
    runner.prefill(slot, prompt)
    checked = runner.verify(slot, tail)  # [5, V]
    assert checked.shape == (len(tail), runner.info.vocab_size)
    for i in range(len(tail)):
        fresh = SlotRunner(tiny_build_dir, CPU, SlotConfig(max_batch=1, max_context=128, forward_tokens=32))
        alone = fresh.prefill(fresh.allocate(), prompt + tail[: i + 1])
        assert np.array_equal(alone, checked[i]), f"position {i}"
    # Keep two of the proposals: the row then decodes exactly as a row whose prompt ended there.
    runner.table.truncate(slot, len(prompt) + 2)
    after = runner.decode([slot], [tail[2]])[0]
    other = runner.allocate()
    runner.prefill(other, prompt + tail[:2])
    assert np.array_equal(after, runner.decode([other], [tail[2]])[0])
    with pytest.raises(ValueError):
        runner.verify(slot, tail[:1])  # one token on top of a past would take the decode path
