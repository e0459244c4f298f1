"""CUDA: what `make gpu-check` runs on a machine with a GPU. Skipped, with the reason, everywhere else.

- the fp16 build's greedy tokens on CUDA equal the CPU's on the tiny model;
- batch invariance on CUDA: a shared step gives every row its solo logits; a request in a freed slot below a
  busy one (the churn bug's schedule) gives its solo tokens; copied prefixes decode like their source;
- CUDA graphs replay what the launched kernels compute;
- a real `streamgen serve --device cuda` answers over the WebSocket.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from streamgen.engine.device import Device, cuda_problem
from streamgen.engine.generate import generate
from streamgen.engine.invariance import batch_invariant
from streamgen.engine.loader import load_model
from streamgen.engine.params import SamplingParams
from streamgen.engine.request import TokenEvent, prepare_request
from streamgen.engine.slots import SlotConfig, SlotRunner
from streamgen.model_files import Build

from conftest import CPU, ServerProcess
from helpers import greedy_slot, quiet

_PROBLEM = cuda_problem()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_PROBLEM is not None, reason=f"no usable CUDA: {_PROBLEM}")]
GPU = Device("cuda")
PROMPTS = ["The quick brown fox", "Paris is the capital of France. Berlin is", "Code: def f(x): return"]


@pytest.fixture(scope="module")
def fp16_dir(tiny_hf_dir, tiny_cache, tiny_model_dir):
    from streamgen.models.pull import pull

    return pull(str(tiny_hf_dir), Build("none", "fp16"), tiny_cache, quiet())


def _greedy(model, prompts: list[str], tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    requests = [prepare_request(model.tokenizer, model.context_length, params, prompt=p) for p in prompts]
    out: list[list[int]] = [[] for _ in prompts]
    for event in generate(model.runner, model.tokenizer, requests):
        if isinstance(event, TokenEvent):
            out[event.key].append(event.token_id)
    return out


def test_cuda_greedy_equals_cpu_fp16_greedy(fp16_dir) -> None:
    on_cpu = load_model(fp16_dir, CPU)
    on_gpu = load_model(fp16_dir, GPU)
    assert on_gpu.provider == "CUDAExecutionProvider"
    assert _greedy(on_gpu, PROMPTS) == _greedy(on_cpu, PROMPTS)


@pytest.mark.parametrize("graphs", [False, True], ids=["launched", "cuda graphs"])
def test_a_shared_step_gives_every_row_its_solo_logits(fp16_dir, tiny_model, graphs: bool) -> None:
    runner = SlotRunner(fp16_dir, Device("cuda", cuda_graphs=graphs), SlotConfig(max_batch=4, max_context=128))
    prompts = [tiny_model.tokenizer.encode(p) for p in PROMPTS]
    assert batch_invariant(runner, prompts)


def test_cuda_graphs_replay_what_the_kernels_compute(fp16_dir, tiny_model) -> None:
    prompt = tiny_model.tokenizer.encode(PROMPTS[1])
    launched = SlotRunner(fp16_dir, GPU, SlotConfig(max_batch=2, max_context=128))
    replayed = SlotRunner(fp16_dir, Device("cuda", cuda_graphs=True), SlotConfig(max_batch=2, max_context=128))
    assert greedy_slot(launched, launched.allocate(), prompt, 32) == greedy_slot(replayed, replayed.allocate(),
                                                                                prompt, 32)


def test_a_request_in_a_freed_slot_below_a_busy_one_equals_its_solo_run(fp16_dir, tiny_model) -> None:
    """The churn bug's schedule on the GPU: A in slot 0 ends, B keeps decoding in slot 1, C takes slot 0."""
    tok = tiny_model.tokenizer
    runner = SlotRunner(fp16_dir, GPU, SlotConfig(max_batch=2, max_context=160))
    c = tok.encode(PROMPTS[2])
    solo_slot = runner.allocate()
    solo = greedy_slot(runner, solo_slot, c, 24)
    runner.free(solo_slot)
    a, b = runner.allocate(), runner.allocate()
    greedy_slot(runner, a, tok.encode(PROMPTS[0]), 3)
    runner.free(a)
    b_logits = runner.prefill(b, tok.encode(PROMPTS[1]))
    c_slot = runner.allocate()
    assert c_slot == 0
    c_logits = runner.prefill(c_slot, c)
    crowded = []
    b_token = int(b_logits.argmax())
    for _ in range(24):
        crowded.append(int(c_logits.argmax()))
        rows = runner.decode([c_slot, b], [crowded[-1], b_token])
        c_logits, b_token = rows[0], int(rows[1].argmax())
    assert crowded == solo


def test_a_copied_prefix_decodes_like_its_source_on_the_gpu(fp16_dir, tiny_model) -> None:
    tok = tiny_model.tokenizer
    runner = SlotRunner(fp16_dir, GPU, SlotConfig(max_batch=3, max_context=128))
    shared, tail = tok.encode(PROMPTS[1]), tok.encode(" The quick brown fox")
    alone = runner.allocate()
    solo = greedy_slot(runner, alone, shared + tail, 16)
    runner.free(alone)
    source, target = runner.allocate(), runner.allocate()
    runner.prefill(source, shared + tok.encode(" Hello"))
    runner.copy_prefix(source, target, len(shared))
    assert greedy_slot(runner, target, tail, 16) == solo


@pytest.mark.parametrize("graphs", ["off", "on"])
def test_streamgen_serve_on_cuda_answers_over_the_websocket(tiny_cache, tiny_hf_dir, fp16_dir, graphs: str) -> None:
    import websockets

    server = ServerProcess(tiny_cache.home, "--model", str(tiny_hf_dir), "--quantize", "none", "--device", "cuda",
                           "--cuda-graphs", graphs)
    try:
        server.wait_ready()
        models = json.loads(__import__("urllib.request").request.urlopen(server.url + "/v1/models").read())
        assert models["data"][0]["provider"] == "CUDAExecutionProvider" and models["data"][0]["precision"] == "fp16"

        async def ask() -> dict:
            async with websockets.connect(server.ws_url) as ws:
                await ws.send(json.dumps({"type": "generate", "id": "g", "prompt": PROMPTS[0],
                                          "params": {"temperature": 0, "max_tokens": 16, "ignore_eos": True}}))
                while (msg := json.loads(await ws.recv()))["type"] not in ("done", "error"):
                    pass
                return msg

        done = asyncio.run(ask())
        assert done["type"] == "done" and done["usage"]["completion_tokens"] == 16
    finally:
        server.stop()


def test_kv_buffers_live_on_the_gpu(fp16_dir) -> None:
    runner = SlotRunner(fp16_dir, GPU, SlotConfig(max_batch=2, max_context=64))
    assert all(kv.device_name().lower().startswith("cuda") for kv in runner._kv)
    with pytest.raises(ValueError, match="device memory"):
        runner.kv_views()
    assert np.isfinite(runner.prefill(runner.allocate(), [5, 6, 7])).all()
