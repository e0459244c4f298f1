"""Builds in other number formats: fp16 activations, an int8 KV cache. Export extra only.

- `to_fp16`: the whole graph in float16 (weights, activations, the KV cache
  and the GroupQueryAttention nodes), logits still float32. ONNX Runtime's
  CUDA GroupQueryAttention exists only for fp16 and bf16, so this is the
  build a GPU serves; its CPU provider runs fp16 GQA natively too, so the
  build is checked on the CPU before it is published. (bf16 is not built:
  the CPU has no bf16 GQA kernel to check it with.)
- `int8_kv`: the KV cache in 8 bits with per-channel scales, activations
  unchanged. ONNX Runtime's CPU GQA reads and writes it in place, so the
  static slots keep working; an fp16 cache beside fp32 activations would not
  (ONNX Runtime casts around the node, copying the whole cache every step).
  The scales come from the K/V the fp32 model writes on calibration text
  (models/kv_calibration.txt), with a margin.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CALIBRATION = Path(__file__).with_name("kv_calibration.txt")
KV_MARGIN = 1.05  # scales cover 5 % beyond the largest |K| / |V| seen in calibration
_PAST = "past_key_values."
_PRESENT = "present."


def to_fp16(model):
    """The model in float16 except its logits output; returns (model, notes)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(model, keep_io_types=["logits"], disable_shape_infer=True)
    return converted, ["fp16: weights, activations, KV cache and GroupQueryAttention in float16 "
                       "(onnxruntime.transformers.float16); logits float32"]


def calibrate_kv(base_dir: Path, max_tokens: int = 512) -> dict[str, np.ndarray]:
    """Per KV input name, the largest |value| per (kv head, channel) the fp32 build writes on the calibration
    text: what the int8 scales must cover."""
    from streamgen.engine.device import Device
    from streamgen.engine.slots import SlotConfig, SlotRunner
    from streamgen.engine.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_dir(base_dir)
    texts = [p.strip() for p in CALIBRATION.read_text().split("\n\n") if p.strip()]
    runner = SlotRunner(base_dir, Device("cpu"), SlotConfig(max_batch=1, max_context=max_tokens))
    largest = [np.zeros((runner.info.num_kv_heads, runner.info.head_dim), np.float32) for _ in runner._kv]
    for text in texts:
        ids = tokenizer.encode(text)[: runner.max_context]
        slot = runner.allocate()
        runner.prefill(slot, ids)
        for i, kv in enumerate(runner.kv_views()):
            largest[i] = np.maximum(largest[i], np.abs(kv[slot, :, : len(ids)]).max(axis=1))
        runner.free(slot)
    return dict(zip(runner.past_names, largest))


def int8_kv(model, largest: dict[str, np.ndarray]):
    """Give every GroupQueryAttention node an int8 KV cache with per-channel scales; returns (model, notes)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    edited = 0
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        scales = []
        for past in (node.input[3], node.input[4]):  # past_key, past_value
            scale = np.maximum(largest[past] * KV_MARGIN / 127.0, 1e-6)  # [kv_heads, head_dim]
            name = f"/streamgen/kv_scale/{past}"
            graph.initializer.append(numpy_helper.from_array(scale[None, :, None, :].astype(np.float32), name))
            scales.append(name)
        inputs = list(node.input) + [""] * (12 - len(node.input))
        del node.input[:]
        node.input.extend(inputs[:12] + scales)  # inputs 12 and 13: k_scale, v_scale
        node.attribute.extend([helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               helper.make_attribute("kv_cache_bit_width", 8)])
        edited += 1
    for value in [*graph.input, *graph.output]:
        if value.name.startswith((_PAST, _PRESENT)):
            value.type.tensor_type.elem_type = TensorProto.INT8
    return model, [f"int8 KV cache: {edited} GroupQueryAttention nodes with per-channel scales, "
                   f"{KV_MARGIN:.2f}x the largest K/V seen on models/kv_calibration.txt"]
