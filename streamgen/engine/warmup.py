"""Warm a loaded model up before the first request, the same way for the server and for batch files.

ONNX Runtime sets much up lazily on a session's first runs, and on the first
run at each new batch shape: a cold decode width costs several steps' time,
and sixteen clients arriving together would meet all of them. So before a
model serves anyone it runs one short generation, one decode step at every
width (which also touches every KV row's pages once), and then the check that
this build on this CPU gives a row the same logits in a batch as alone
(engine/invariance.py).
"""

from __future__ import annotations

import structlog

from streamgen.engine.executor import KVRunner
from streamgen.engine.generate import generate
from streamgen.engine.invariance import batch_invariant
from streamgen.engine.params import SamplingParams, Speculation
from streamgen.engine.request import GenerationRequest
from streamgen.engine.slot_table import MIN_PREFILL_PASS
from streamgen.engine.tokenizer import TextTokenizer

log = structlog.get_logger("streamgen.engine")


def warm_up(runner: KVRunner, tokenizer: TextTokenizer, quantization: str = "") -> bool:
    """Warm the runner up and return whether it is batch invariant (a warning is logged when it is not).
    Leaves every row empty and free."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for _ in generate(runner, tokenizer, [GenerationRequest(tuple(tokenizer.encode("Hello")), params, frozenset())]):
        pass
    _warm_decode_widths(runner)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 2)
    _warm_verification_lengths(runner, ids)
    invariant = batch_invariant(runner, [ids[:7], ids[:13]])
    if not invariant:
        log.warning("engine.not_batch_invariant", quantization=quantization,
                    advice="this build's kernels compute a row differently in a batch on this CPU, so a request's "
                           "tokens can depend on the requests beside it; the fp32 and int8 builds do not, or serve "
                           "with --max-batch 1")
    return invariant


def _warm_verification_lengths(runner: KVRunner, ids: list[int]) -> None:
    """One speculative verification pass of every length a default proposal makes (engine/speculation.py)."""
    if not getattr(runner, "supports_speculation", False) or len(ids) < 4:
        return
    table = runner.table
    slot = table.free_slots()[0]
    table.claim(slot)
    try:
        runner.prefill(slot, ids[:2])
        for n in range(MIN_PREFILL_PASS, min(Speculation().max_draft + 1, runner.prompt_pass_tokens) + 1):
            runner.verify(slot, (ids * n)[:n])
            table.truncate(slot, 2)
    finally:
        table.release(slot, keep_contents=False)


def _warm_decode_widths(runner: KVRunner) -> None:
    """One decode step at every width."""
    if runner.max_slots < 2:
        return  # one slot, one shape: the warm-up generation already ran it
    table = runner.table
    slots = table.free_slots()
    for slot in slots:
        table.claim(slot)
    try:
        for width in range(1, len(slots) + 1):
            runner.decode(slots[:width], [0] * width)
    finally:
        for slot in slots:
            table.release(slot, keep_contents=False)
