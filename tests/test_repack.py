"""Exact repacking of GGUF-grid weights (models/repack.py) on small synthetic weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx", reason="the export toolchain (tiny tier)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from streamgen.errors import PullError
from streamgen.model_files import CacheLayout
from streamgen.models.pull import pull
from streamgen.models.repack import match_q4_1, match_q8_0, repack_exact

from helpers import quiet

pytestmark = pytest.mark.tiny  # needs onnx, the export toolchain

K, N = 96, 40
rng = np.random.default_rng(7)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def q4_1_weight() -> np.ndarray:
    """[K, N] weight dequantized the way GGUF does: d * q + m per block of 32 along K."""
    q = rng.integers(0, 16, (N, K // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # GGUF's quantizer always uses both ends of the range
    d = _fp16(rng.uniform(0.001, 0.02, (N, K // 32, 1)))
    m = _fp16(-rng.uniform(0.0, 0.15, (N, K // 32, 1)))
    return np.ascontiguousarray((d * q + m).reshape(N, K).T)


def q8_0_weight() -> np.ndarray:
    q = rng.integers(-127, 128, (N, K // 32, 32)).astype(np.float32)
    q[..., 0] = 127
    d = _fp16(rng.uniform(0.0005, 0.002, (N, K // 32, 1)))
    return np.ascontiguousarray((d * q).reshape(N, K).T)


def test_grid_weights_are_recovered_bit_exactly_and_nothing_else_matches() -> None:
    w4, w8 = q4_1_weight(), q8_0_weight()
    g4, g8 = match_q4_1(w4), match_q8_0(w8)
    assert g4 is not None and g8 is not None
    # MatMulNBits' symmetric decoding, (level - 2^(bits-1)) * scale, plus the Q4_1 block offset.
    rebuilt4 = (g4.levels.astype(np.float32) - 8) * g4.scales[..., None] + g4.offsets[..., None]
    np.testing.assert_allclose(rebuilt4.reshape(N, K).T, w4, rtol=0, atol=1e-7)
    rebuilt8 = (g8.levels.astype(np.float32) - 128) * g8.scales[..., None]
    assert np.array_equal(rebuilt8.reshape(N, K).T, w8)

    nudged = w4.copy()
    nudged[5, 3] = np.nextafter(nudged[5, 3], np.float32(1))  # one ulp off the grid
    assert match_q4_1(nudged) is None
    assert match_q4_1(rng.standard_normal((K, N)).astype(np.float32)) is None
    assert match_q8_0(rng.standard_normal((K, N)).astype(np.float32)) is None
    assert match_q8_0(w4) is None, "a Q4_1 weight (with offsets) is not symmetric Q8_0"
    assert match_q4_1(w4[:80]) is None, "K must be whole blocks"


def _graph(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x [1, 3, K] -> one MatMul per weight, all sharing the input."""
    nodes = [helper.make_node("MatMul", ["x", name], [f"y_{name}"], name=f"/{name}/MatMul") for name in weights]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, K])],
        [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, [1, 3, N]) for name in weights],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_repacked_matmuls_compute_the_source_products(bits: int) -> None:
    weights = {"w41": q4_1_weight(), "w80": q8_0_weight(), "dense": rng.standard_normal((K, N)).astype(np.float32)}
    x = rng.standard_normal((1, 3, K)).astype(np.float32)
    outputs = {}
    for level in (1, 4):  # 1: fp32 activations (exactness), 4: int8 activations (the fast CPU path)
        model = _graph(weights)
        notes = repack_exact(model, bits=bits, accuracy_level=level)
        assert notes == [f"1 Q4_1 weight(s) repacked exactly as {bits}-bit MatMulNBits (no re-quantization)",
                         "1 Q8_0 weight(s) repacked exactly as 8-bit MatMulNBits (no re-quantization)"]
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("MatMulNBits") == 2
        assert sum(n.name.startswith("/streamgen/block_sum") for n in model.graph.node) == 1, "one per shared input"
        assert "dense" in {i.name for i in model.graph.initializer}, "off-grid weights are left alone"
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs[level] = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x})))
    for name, w in weights.items():
        want = x @ w
        scale = np.abs(want).max()
        np.testing.assert_allclose(outputs[1][f"y_{name}"], want, rtol=0, atol=2e-6 * scale)
        assert np.abs(outputs[4][f"y_{name}"] - want).max() < 0.02 * scale


def test_source_quantization_refuses_a_model_not_on_a_grid(
    tiny_model_dir: Path, tiny_hf_dir: Path, tiny_cache: CacheLayout
) -> None:
    with pytest.raises(PullError, match="not.*grid|Use --quantize int8 or int4"):
        pull(str(tiny_hf_dir), "source", tiny_cache, quiet())
    assert tiny_cache.is_published(str(tiny_hf_dir), "none", "gqa")
    assert not tiny_cache.is_published(str(tiny_hf_dir), "source", "gqa")
    assert not any(tiny_cache.tmp.iterdir()), "the failed build left nothing behind"
