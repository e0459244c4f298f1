"""Check a GroupQueryAttention export against the source model before publishing it.

Optimum's own validation cannot run on that graph, so this replaces it: the
source model (transformers, torch) generates greedy tokens for a fixed prompt;
the new graph, run through streamgen's own slot runner with a small prefill
chunk (so chunked prefill is exercised too), is fed the same tokens (teacher
forcing) and must pick the same greedy token at every step. A step may differ
only where the source's top two logits are a near-tie.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from streamgen.errors import PullError

PROMPT = "The capital of France is Paris. The capital of Germany is"
STEPS = 24
NEAR_TIE = 1e-3  # logit gap below which either greedy pick is right


def reference_greedy(source: str | Path, prompt: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """transformers' own greedy decoding of the source model (eager attention, fp32, its KV cache, token by
    token as it generates): the tokens and the logits [steps, V] each was picked from. Step by step rather than
    one forward over the whole sequence, because some RoPE (longrope) rotates a position by the length the
    sequence has when it is computed."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = reference.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0,
            output_logits=True, return_dict_in_generate=True,
        )
    generated = out.sequences[0, len(prompt):].tolist()
    return generated, torch.cat(out.logits).float().numpy()


def validate_export(model_dir: Path, source: str | Path) -> str:
    """Raises PullError when the export disagrees with the source; returns a note for the manifest."""
    from streamgen.engine.device import Device
    from streamgen.engine.slots import SlotConfig, SlotRunner
    from streamgen.engine.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode(PROMPT)
    generated, ref_logits = reference_greedy(source, prompt, STEPS)

    runner = SlotRunner(model_dir, Device("cpu"), SlotConfig(max_batch=2, max_context=len(prompt) + STEPS + 1,
                                                             forward_tokens=max(2, len(prompt) // 3)))
    slot = runner.allocate()
    ours = [runner.prefill(slot, prompt)]
    for token in generated[:-1]:
        ours.append(runner.decode([slot], [token])[0])
    ours = np.stack(ours)  # [STEPS, V]

    worst = float(np.abs(ours - ref_logits).max())
    for step, (mine, theirs) in enumerate(zip(ours, ref_logits)):
        if int(mine.argmax()) != int(theirs.argmax()):
            top2 = np.sort(theirs)[-2:]
            if top2[1] - top2[0] > NEAR_TIE:
                raise PullError(
                    f"the GroupQueryAttention export disagrees with the source model at step {step} "
                    f"(greedy token {int(mine.argmax())} vs {int(theirs.argmax())}, largest logit difference "
                    f"{worst:.3g}); it was not published. Pull with --graph plain to use Optimum's graph"
                )
    return f"validated against the source model: {STEPS} greedy steps agree, largest logit difference {worst:.2g}"


# Least top-1 agreement with the fp32 build, under teacher forcing, for a derived build to be published. It
# catches a broken conversion (agreement near 1 / vocabulary size), not a lossy one: `bench quality` measures
# that (the default model: int8 96 %, int4 63 %, fp16 and an int8 KV cache about 99 %; the tests' random
# tiny model loses far more to 4 bits).
MIN_AGREEMENT = {"none": 0.75, "int8": 0.5, "source": 0.5, "int4": 0.1}


def check_build(build_dir: Path, base_dir: Path, quantization: str) -> str:
    """A build made from the fp32 export must track it: finite logits, and the same greedy token at most steps
    of the fp32 build's own greedy continuation. Both are opened as the engine serves them (engine/loader.py:
    the GQA graph's slots, the plain graph's own runner), so build_dir needs a manifest naming its graph.
    Raises PullError; returns a note for the manifest."""
    from streamgen.engine.device import Device
    from streamgen.engine.loader import load_model
    from streamgen.engine.slots import SlotConfig
    from streamgen.engine.tokenizer import TextTokenizer

    prompt = TextTokenizer.from_dir(base_dir).encode(PROMPT)
    slots = SlotConfig(max_batch=1, max_context=len(prompt) + STEPS + 1)
    rows = {}
    generated: list[int] = []
    for name, directory in (("base", base_dir), ("build", build_dir)):
        runner = load_model(directory, Device("cpu"), slots=slots).runner
        slot = runner.allocate()
        logits = [runner.prefill(slot, prompt)]
        for step in range(STEPS - 1):
            if name == "base":
                generated.append(int(logits[-1].argmax()))
            logits.append(runner.decode([slot], [generated[step]])[0])
        rows[name] = np.stack(logits)
    if not np.isfinite(rows["build"]).all():
        raise PullError("the build gives non-finite logits; it was not published")
    agreement = float((rows["base"].argmax(axis=1) == rows["build"].argmax(axis=1)).mean())
    needed = MIN_AGREEMENT[quantization]
    if agreement < needed:
        raise PullError(f"the build agrees with the fp32 build on {agreement:.0%} of {STEPS} greedy steps, below the "
                        f"{needed:.0%} this quantization keeps; it was not published")
    return f"checked against the fp32 build: {agreement:.0%} of {STEPS} teacher-forced greedy steps agree"
