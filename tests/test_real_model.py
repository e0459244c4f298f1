"""Integration: the real default model, pulled once into the cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from streamgen.engine.detok import IncrementalDetokenizer
from streamgen.engine.generate import generate
from streamgen.engine.loader import LoadedModel
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import FinishEvent, TokenEvent, prepare_request
from streamgen.engine.tokenizer import ChatMessage

pytestmark = pytest.mark.integration


def _chat(model: LoadedModel, question: str, **params) -> tuple[str, FinishEvent, list[TokenEvent]]:
    req = prepare_request(
        model.tokenizer, model.context_length, SamplingParams(**params), messages=[ChatMessage("user", question)]
    )
    tokens, final = [], None
    for e in generate(model.runner, model.tokenizer, [req]):
        if isinstance(e, TokenEvent):
            tokens.append(e)
        else:
            final = e
    return "".join(t.text for t in tokens) + final.tail, final, tokens


def test_greedy_chat_answer_names_paris(real_model: LoadedModel) -> None:
    text, final, _ = _chat(real_model, "What is the capital of France?", temperature=0.0, max_tokens=32)
    assert "Paris" in text
    assert final.finish_reason == "stop", "the answer ends on <|im_end|>, not on max_tokens"
    assert final.text == text


def test_stop_ids_come_from_config_and_template_not_the_swapped_eos(real_model: LoadedModel) -> None:
    tok = real_model.tokenizer
    assert tok.token_to_id("<|im_end|>") in tok.stop_token_ids
    # The GGUF conversion reports <|im_start|> as eos; it must not stop generation.
    assert tok.token_to_id("<|im_start|>") not in tok.stop_token_ids


def test_streamed_text_keeps_spaces_and_equals_a_full_decode(real_model: LoadedModel) -> None:
    text, final, tokens = _chat(real_model, "Name three colours.", temperature=0.0, max_tokens=40)
    full = real_model.tokenizer.decode([t.token_id for t in tokens])
    assert text == full
    assert " " in text.strip()


def test_real_tokenizer_detokenizes_cjk_and_emoji(real_model: LoadedModel) -> None:
    tok = real_model.tokenizer
    text = "Bonjour ! 你好，世界 🎉🚀 naïve café"
    detok = IncrementalDetokenizer(tok.decode, tok.encode("Say:"), ())
    deltas = [detok.add(t).delta for t in tok.encode(text)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == text


def test_seeded_sampling_is_reproducible(real_model: LoadedModel) -> None:
    runs = [_chat(real_model, "Tell me a fact.", temperature=1.0, top_p=0.9, seed=11, max_tokens=24)[0] for _ in range(2)]
    assert runs[0] == runs[1]


def test_generate_cli_streams_tokens_over_time(real_model_dir: Path) -> None:
    home = real_model_dir.parents[2]
    cmd = [
        sys.executable, "-m", "streamgen", "generate", "--home", str(home), "--no-pull",
        "--quantize", "none", "--temperature", "0", "--max-tokens", "64", "--ignore-eos",
        "Tell me a long story about a dragon.",
    ]
    arrivals: list[tuple[float, bytes]] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 4096):
            arrivals.append((time.monotonic(), chunk))
        proc.wait(timeout=60)
        summary = proc.stderr.read().decode()
    assert proc.returncode == 0, summary
    assert "64 tokens" in summary and "tokens/s" in summary and "time to first token" in summary
    # Tokens arrive as they are sampled: many separate writes, spread over the
    # generation rather than bunched at its end.
    assert len(arrivals) >= 16
    span = arrivals[-1][0] - arrivals[0][0]
    first_half = [t for t, _ in arrivals if t < arrivals[0][0] + span / 2]
    assert len(first_half) >= 5
    assert len(b"".join(c for _, c in arrivals).decode().split()) > 10


def test_gqa_greedy_equals_the_plain_export_for_64_steps(real_model: LoadedModel, real_plain_dir: Path) -> None:
    from streamgen.engine.loader import load_model

    from conftest import CPU

    assert real_model.manifest.graph == "gqa"
    plain = load_model(real_plain_dir, CPU)
    assert plain.manifest.graph == "plain"
    prompts = ["Tell me about the moon.", "Write a poem about autumn leaves."]
    for prompt in prompts:
        kwargs = dict(temperature=0.0, max_tokens=64, ignore_eos=True)
        gqa_ids = [t.token_id for t in _chat(real_model, prompt, **kwargs)[2]]
        plain_ids = [t.token_id for t in _chat(plain, prompt, **kwargs)[2]]
        assert len(gqa_ids) == 64 and gqa_ids == plain_ids


FRANCE_FLIP = (
    "fp32 prefers 'The' over 'L' as the first token by 0.08 logits; int8 quantization moves the logits by more "
    "than that and the greedy answer starts in French ('L'Abbé ...'). Not the weights alone: "
    "the bit-exact source build flips too, from int8 activations (test_source_build_is_the_source_model)"
)


@pytest.mark.parametrize(
    ("quantization", "question", "answer"),
    [
        ("int4", "What is the capital of France?", "Paris"),
        pytest.param("int8", "What is the capital of France?", "Paris",
                     marks=pytest.mark.xfail(strict=True, reason=FRANCE_FLIP)),
        ("int4", "What is the capital of Germany?", "Berlin"),
        ("int8", "What is the capital of Germany?", "Berlin"),
        ("source", "What is the capital of Germany?", "Berlin"),
    ],
)
def test_quantized_builds_still_answer(real_cache, real_model_dir: Path, quantization: str, question: str,
                                       answer: str) -> None:
    from streamgen.engine.loader import load_model
    from streamgen.model_files import DEFAULT_MODEL
    from streamgen.models.pull import pull

    from conftest import CPU

    model = load_model(pull(DEFAULT_MODEL, quantization, real_cache), CPU)
    assert model.manifest.graph == "gqa" and model.manifest.quantization == quantization
    text, _, _ = _chat(model, question, temperature=0.0, max_tokens=32)
    assert answer in text


def test_source_build_is_the_source_model(real_cache, real_model_dir: Path, tmp_path: Path) -> None:
    """The default model's GGUF levels, repacked without re-quantization (models/repack.py).

    With fp32 activations (accuracy_level 1) the build reproduces the fp32 export's
    logits; with the int8 activations of the fast path (the build as shipped) it
    stays far closer to fp32 than re-quantized int4 does.
    """
    import onnx

    from streamgen.bench.quality import load_texts, run_quality
    from streamgen.engine.slots import SlotConfig, SlotRunner
    from streamgen.engine.loader import load_model
    from streamgen.model_files import DEFAULT_MODEL, Manifest
    from streamgen.models.pull import pull

    from conftest import CPU

    source = pull(DEFAULT_MODEL, "source", real_cache)
    notes = Manifest.read(source).notes
    assert "150 Q4_1 weight(s) repacked exactly as 4-bit MatMulNBits (no re-quantization)" in notes
    assert "1 Q8_0 weight(s) repacked exactly as 8-bit MatMulNBits (no re-quantization)" in notes

    exact = tmp_path / "exact"
    shutil.copytree(source, exact)
    model = onnx.load(str(exact / "model.onnx"))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = 1
    onnx.save(model, str(exact / "model.onnx"))
    del model

    load = load_model(real_model_dir, CPU)
    ids = load.tokenizer.encode(load.tokenizer.render_chat([ChatMessage("user", "What is the capital of France?")]))
    logits = {}
    for name, directory in {"fp32": real_model_dir, "exact": exact}.items():
        runner = SlotRunner(directory, CPU, SlotConfig(max_batch=1, max_context=128))
        logits[name] = runner.prefill(runner.allocate(), ids)
    np.testing.assert_allclose(logits["exact"], logits["fp32"], rtol=0, atol=1e-3)
    assert load.tokenizer.decode([int(logits["exact"].argmax())]) == "The"

    rows = {r.quantization: r for r in run_quality({"none": real_model_dir, "source": source,
                                                    "int4": pull(DEFAULT_MODEL, "int4", real_cache)},
                                                   texts=load_texts()[:4])}
    assert rows["source"].mean_kl < 0.01 and rows["source"].top1_agreement > 0.9
    assert rows["source"].mean_kl < rows["int4"].mean_kl / 10


@pytest.mark.parametrize("quantization", ["none", "int8", "int4", "source"])
def test_every_build_is_batch_invariant(real_cache, real_model_dir: Path, quantization: str) -> None:
    """A decode step shared by rows of different lengths gives each row, bit for bit, its solo logits.

    Not a given for quantized kernels: ORT's MatMulNBits with int8 activations and 8-bit blocks of 128
    computes several rows differently from one, which is why int8 uses blocks of 64; its 4-bit kernels
    (int4, source) are invariant with AVX-512 but not with AVX2. fp32 and int8 must be invariant on
    every CPU; the engine checks the build it loads at start-up and says so (test_engine_reports...)."""
    from streamgen.engine.invariance import batch_invariant
    from streamgen.engine.slots import SlotConfig, SlotRunner
    from streamgen.engine.tokenizer import TextTokenizer
    from streamgen.model_files import DEFAULT_MODEL
    from streamgen.models.pull import pull

    from conftest import CPU

    directory = pull(DEFAULT_MODEL, quantization, real_cache)
    ids = TextTokenizer.from_dir(directory).encode("The quick brown fox jumps over the lazy dog. " * 6)
    prompts = [ids[: 8 + 7 * i] for i in range(6)]
    runner = SlotRunner(directory, CPU, SlotConfig(max_batch=len(prompts), max_context=128))
    invariant = batch_invariant(runner, prompts)
    if quantization in ("none", "int8"):
        assert invariant, f"{quantization} must give every row its solo logits in a shared step"
    else:
        assert invariant or not _cpu_has("avx512f"), f"{quantization} with AVX-512 is batch-invariant"


def _cpu_has(flag: str) -> bool:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return any(flag in line.split() for line in text.splitlines() if line.startswith("flags"))
