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


def validate_export(model_dir: Path, source: str | Path) -> str:
    """Raises PullError when the export disagrees with the source; returns a note for the manifest."""
    import torch
    from transformers import AutoModelForCausalLM

    from streamgen.engine.device import Device
    from streamgen.engine.slots import SlotConfig, SlotRunner
    from streamgen.engine.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode(PROMPT)
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.no_grad():
        generated = reference.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False, pad_token_id=0,
        )[0, len(prompt):].tolist()
        ref_logits = reference(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1].float().numpy()

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
