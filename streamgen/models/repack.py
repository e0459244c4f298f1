"""Exact repacking of weights that already lie on a GGUF quantization grid.

The default model comes from a Q4_1 GGUF, so its "fp32" export is not really
full precision: every linear weight is `d * q + m` per block of 32 inputs
(q in 0..15, d and m fp16), and the tied embedding is Q8_0 (`d * q`, q in
-127..127). Quantizing such weights again puts them on a second, different
grid and only adds error: 4-bit re-quantization of the default model costs
27 % perplexity, 8-bit 0.8 % (docs/benchmarks.md).

So each MatMul weight is tested for a grid by reconstruction: its (q, d, m)
are recovered and the weight is rebuilt; only a bit-for-bit match is
repacked, anything else is left as it is. A repacked weight gives the same
products as the source model, up to float rounding and the int8 activations
of accuracy_level 4:

  Q8_0:  W x = sum_b d_b q_b . x_b
         -> one symmetric 8-bit MatMulNBits.
  Q4_1:  W x = sum_b d_b (q_b - 8) . x_b  +  sum_b (m_b + 8 d_b) * sum(x_b)
         -> a symmetric MatMulNBits (the fast kernel: no zero points) plus a
            small fp32 MatMul of the block sums of x by a [K/32, N] matrix.

The offset matrix is 1/32 of the weight's size; the block sums it multiplies
are computed once per input and shared by the MatMuls that read it (gate/up).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

BLOCK = 32  # the block size of both GGUF formats and of the MatMulNBits built here


@dataclass(frozen=True, slots=True)
class GridWeight:
    """A [K, N] weight recovered as levels on a per-block grid (blocks of 32 along K)."""

    levels: np.ndarray  # uint8 [N, K/32, 32]: stored levels, already offset for MatMulNBits' default zero point
    scales: np.ndarray  # float32 [N, K/32]
    offsets: np.ndarray | None  # float32 [N, K/32], the per-block constant (m + 8 d); None for Q8_0
    bits: int  # bits needed to hold the levels
    source: str  # "Q4_1" or "Q8_0"


def _blocks(weight: np.ndarray) -> np.ndarray | None:
    if weight.ndim != 2 or weight.dtype != np.float32 or weight.shape[0] % BLOCK:
        return None
    k, n = weight.shape
    return np.ascontiguousarray(weight.T).reshape(n, k // BLOCK, BLOCK)


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def match_q8_0(weight: np.ndarray) -> GridWeight | None:
    """The weight as Q8_0 (d * q, q in -127..127, d fp16), or None if it is not exactly that."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        d = _fp16(np.abs(blocks).max(-1, keepdims=True) / 127)
        q = np.where(d > 0, np.rint(blocks / np.where(d > 0, d, 1)), 0)
    if np.abs(q).max() > 127 or not np.array_equal(d * q, blocks):
        return None
    return GridWeight((q + 128).astype(np.uint8), d[..., 0], None, 8, "Q8_0")


def match_q4_1(weight: np.ndarray) -> GridWeight | None:
    """The weight as Q4_1 (d * q + m, q in 0..15, d and m fp16), or None if it is not exactly that."""
    blocks = _blocks(weight)
    if blocks is None:
        return None
    m = blocks.min(-1, keepdims=True)
    d = _fp16((blocks.max(-1, keepdims=True) - m) / 15)
    q = np.clip(np.rint((blocks - m) / np.where(d > 0, d, 1)), 0, 15)
    # Same arithmetic as GGUF's dequantization, so an exact source matches bit for bit.
    if not np.array_equal(d * q + m, blocks):
        return None
    return GridWeight(q.astype(np.uint8), d[..., 0], (m + 8 * d)[..., 0], 4, "Q4_1")


def as_bits(grid: GridWeight, bits: int) -> GridWeight:
    """Store the same levels in a wider MatMulNBits (only ever widening: nothing is lost)."""
    if bits == grid.bits:
        return grid
    if bits < grid.bits:
        raise ValueError(f"{grid.source} levels need {grid.bits} bits, not {bits}")
    shift = (1 << (bits - 1)) - (1 << (grid.bits - 1))  # the default zero point moves from 2^(b-1)
    return GridWeight((grid.levels.astype(np.int32) + shift).astype(np.uint8), grid.scales, grid.offsets, bits,
                      grid.source)


def pack(levels: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' B layout: [N, K/32, 32 * bits / 8], two 4-bit levels per byte, low nibble first."""
    if bits == 8:
        return levels
    if bits == 4:
        return (levels[..., 0::2] | (levels[..., 1::2] << 4)).astype(np.uint8)
    raise ValueError(f"unsupported bits {bits}")


def repack_exact(model: onnx.ModelProto, bits: int, accuracy_level: int) -> list[str]:
    """Replace every MatMul whose weight lies exactly on a Q8_0 or Q4_1 grid.

    Q4_1 weights get `bits`-wide MatMulNBits; Q8_0 weights stay 8-bit even in a
    4-bit build, because narrowing them would be a fresh, lossy quantization.
    Returns one note per kind of weight repacked.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    block_sums: dict[str, str] = {}  # MatMul input -> its block-sum tensor, made once
    new_nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()
    counts: dict[tuple[str, int], int] = {}

    for node in graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" else None
        if weight_name not in inits or users[weight_name] != 1:
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[weight_name])
        grid = match_q8_0(weight) or match_q4_1(weight)
        if grid is None:
            new_nodes.append(node)
            continue
        grid = as_bits(grid, max(bits, grid.bits))
        k, n = weight.shape
        x, out, base = node.input[0], node.output[0], node.name or out
        graph.initializer.extend([
            numpy_helper.from_array(pack(grid.levels, grid.bits), f"{weight_name}_Q{grid.bits}"),
            numpy_helper.from_array(grid.scales, f"{weight_name}_scales"),
        ])
        product = out if grid.offsets is None else f"{base}/exact_q"
        new_nodes.append(helper.make_node(
            "MatMulNBits", [x, f"{weight_name}_Q{grid.bits}", f"{weight_name}_scales"], [product],
            name=f"{base}_Q{grid.bits}", domain="com.microsoft",
            K=k, N=n, bits=grid.bits, block_size=BLOCK, accuracy_level=accuracy_level,
        ))
        if grid.offsets is not None:
            if x not in block_sums:
                new_nodes.extend(_block_sum_nodes(graph, x, k, block_sums))
            offsets = f"{weight_name}_offsets"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(grid.offsets.T), offsets))
            new_nodes.append(helper.make_node("MatMul", [block_sums[x], offsets], [f"{base}/exact_offset"],
                                              name=f"{base}/ExactOffset"))
            new_nodes.append(helper.make_node("Add", [product, f"{base}/exact_offset"], [out],
                                              name=f"{base}/ExactAdd"))
        dropped.add(weight_name)
        counts[(grid.source, grid.bits)] = counts.get((grid.source, grid.bits), 0) + 1

    if not counts:
        return []
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return [f"{count} {source} weight(s) repacked exactly as {b}-bit MatMulNBits (no re-quantization)"
            for (source, b), count in sorted(counts.items())]


def _block_sum_nodes(graph: onnx.GraphProto, x: str, k: int, block_sums: dict[str, str]) -> list[onnx.NodeProto]:
    """x [..., K] -> per-block sums [..., K/32], as one MatMul by a 0/1 block-membership matrix
    (one node instead of Reshape + ReduceSum: per-node cost dominates at this size)."""
    stem = f"/streamgen/block_sum/{len(block_sums)}"
    membership = np.repeat(np.eye(k // BLOCK, dtype=np.float32), BLOCK, axis=0)  # [K, K/32]
    graph.initializer.append(numpy_helper.from_array(membership, f"{stem}/membership"))
    block_sums[x] = f"{stem}/sums"
    return [helper.make_node("MatMul", [x, f"{stem}/membership"], [block_sums[x]], name=f"{stem}/MatMul")]
