"""Exact repacking of weights that already lie on a GGUF quantization grid.

Two ways in: `repack_exact` recognises Q4_1 and Q8_0 grids from the weights' values alone (the default model),
and `repack_gguf` reads every other type's levels from the GGUF file itself (see its section below).

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

import collections
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
    users = _input_uses(graph)
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
        new_nodes += _exact_matmul(graph, node, weight_name, grid, k, n, BLOCK, accuracy_level, block_sums)
        dropped.add(weight_name)
        counts[(grid.source, grid.bits)] = counts.get((grid.source, grid.bits), 0) + 1

    if not counts:
        return []
    _replace_nodes(model, new_nodes, dropped)
    return [f"{count} {source} weight(s) repacked exactly as {b}-bit MatMulNBits (no re-quantization)"
            for (source, b), count in sorted(counts.items())]


def _input_uses(graph: onnx.GraphProto) -> collections.Counter[str]:
    """How many node inputs name each tensor: a weight is replaced only where one MatMul alone reads it."""
    return collections.Counter(name for node in graph.node for name in node.input)


def _replace_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto], dropped: set[str]) -> None:
    """The graph's nodes become `nodes`, the replaced weights' initializers go, and the com.microsoft domain
    (MatMulNBits) is imported."""
    graph = model.graph
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [init for init in graph.initializer if init.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _exact_matmul(graph: onnx.GraphProto, node: onnx.NodeProto, weight_name: str, grid, k: int, n: int,
                  block: int, accuracy_level: int, block_sums: dict) -> list[onnx.NodeProto]:
    """The nodes that replace a MatMul by its weight's levels: MatMulNBits over the packed levels and scales and,
    for a grid with per-block offsets (which MatMulNBits cannot hold exactly), the offsets times the input's
    block sums added to its product. The levels' initializers are added to the graph."""
    x, out, base = node.input[0], node.output[0], node.name or node.output[0]
    q_name, s_name = f"{weight_name}_Q{grid.bits}", f"{weight_name}_scales"
    graph.initializer.extend([numpy_helper.from_array(pack(grid.levels, grid.bits), q_name),
                              numpy_helper.from_array(grid.scales, s_name)])
    product = out if grid.offsets is None else f"{base}/exact_q"
    nodes = [helper.make_node("MatMulNBits", [x, q_name, s_name], [product], name=f"{base}_Q{grid.bits}",
                              domain="com.microsoft", K=k, N=n, bits=grid.bits, block_size=block,
                              accuracy_level=accuracy_level)]
    if grid.offsets is not None:
        key = x if block == BLOCK else (x, block)
        if key not in block_sums:
            nodes += _block_sum_nodes(graph, x, k, block_sums, block)
        offsets = f"{weight_name}_offsets"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(grid.offsets.T), offsets))
        nodes.append(helper.make_node("MatMul", [block_sums[key], offsets], [f"{base}/exact_offset"],
                                      name=f"{base}/ExactOffset"))
        nodes.append(helper.make_node("Add", [product, f"{base}/exact_offset"], [out], name=f"{base}/ExactAdd"))
    return nodes


def _block_sum_nodes(graph: onnx.GraphProto, x: str, k: int, block_sums: dict, block: int = BLOCK
                     ) -> list[onnx.NodeProto]:
    """x [..., K] -> per-block sums [..., K/block], as one MatMul by a 0/1 block-membership matrix
    (one node instead of Reshape + ReduceSum: per-node cost dominates at this size). block_sums maps x (and, for
    blocks other than 32, (x, block)) to the sums' name."""
    key = x if block == BLOCK else (x, block)
    stem = f"/streamgen/block_sum/{len(block_sums)}"
    membership = np.repeat(np.eye(k // block, dtype=np.float32), block, axis=0)  # [K, K/block]
    graph.initializer.append(numpy_helper.from_array(membership, f"{stem}/membership"))
    block_sums[key] = f"{stem}/sums"
    return [helper.make_node("MatMul", [x, f"{stem}/membership"], [block_sums[key]], name=f"{stem}/MatMul")]


# ---- from a GGUF's own blocks ------------------------------------------------------------------------------------------
#
# A GGUF such as a Q4_K_M file mixes types (Q4_K, Q5_0, Q6_K, Q8_0, ...) whose levels cannot be told apart from the
# dequantized values alone. So the levels, scales and offsets are read from the file's own blocks, and each MatMul
# weight of the export is found there by its columns: every column is one row of a GGUF tensor, dequantized
# (transformers' conversion uses the same dequantization), so a hash of its bytes finds it, whatever the export
# packed (q, k and v side by side), reordered (Llama's q/k row permutation) or transposed (an untied lm_head).
# Every type is stored exactly, with the levels the file holds:
#   Q4_0, Q4_1, Q4_K (4-bit levels, per-32 scales; Q4_1 and Q4_K with per-32 offsets) -> 4-bit MatMulNBits, where
#     every column of the weight is one of these;
#   Q5_0, Q5_1, Q5_K, Q8_0 (per 32) and Q6_K (per 16) -> 8-bit MatMulNBits (5- and 6-bit levels fit 8 bits as
#     they are), blocks of 16 where a Q6_K column is present, and any 4-bit column in the same weight widened too.
# Offsets (the per-block constant of Q4_1, Q4_K, Q5_1, Q5_K) go through the block sums of the input, as for Q4_1
# above: ONNX Runtime 1.31's MatMulNBits takes float zero points only for 2 and 4 bits and then runs a path
# about 30x slower than the symmetric kernel (measured on a 1024 x 1024 weight: 4.4 ms against 0.13 ms), and not
# at all for 8 bits.

GGUF_EXACT = ("Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
_FOUR_BIT = ("Q4_0", "Q4_1", "Q4_K")
_HASH = np.random.default_rng(20261206).integers(1, 2**63, size=1 << 14, dtype=np.uint64) | np.uint64(1)


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each float32 row's bytes (vectorized; a match is then compared value for value)."""
    words = np.ascontiguousarray(rows, dtype=np.float32).view(np.uint64)  # [R, K/2]
    return (words * _HASH[: words.shape[1]]).sum(axis=1, dtype=np.uint64)


@dataclass(frozen=True, slots=True)
class GGUFLevels:
    """One GGUF tensor's rows as levels on per-sub-block grids: row = scales * levels + offsets, per sub-block."""

    kind: str  # the GGUF type, e.g. "Q4_K"
    levels: np.ndarray  # int16 [rows, K]
    scales: np.ndarray  # float32 [rows, K / sub]
    offsets: np.ndarray | None  # float32 [rows, K / sub]
    sub: int  # sub-block length: 32, or 16 (Q6_K)


def gguf_levels(kind: str, raw: np.ndarray, rows: int, k: int) -> GGUFLevels:
    """Decode a tensor's blocks into levels, scales and offsets, with gguf's own dequantization of blocks whose
    scale fields were set to 1 (and minimums to 0): what is left is each element's level times its sub-block's
    integer scale, which is divided out exactly."""
    from gguf import quants

    codec = getattr(quants, kind)
    size = codec.type_size
    blocks = np.ascontiguousarray(raw).reshape(-1, size).copy()  # [rows * K / per, size]
    one = np.array([1.0], np.float16).view(np.uint8)
    zero = np.zeros(2, np.uint8)
    n = blocks.shape[0]
    if kind == "Q8_0":
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
        levels = blocks[:, 2:].view(np.int8).astype(np.int16)  # [n, 32]
        return _levels(kind, levels, d, None, rows, k, 32)
    if kind in ("Q4_0", "Q5_0"):
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        blocks[:, :2] = one
        levels = np.rint(codec.dequantize_blocks(blocks)).astype(np.int16)  # q - 8 or q - 16
        return _levels(kind, levels, d, None, rows, k, 32)
    if kind in ("Q4_1", "Q5_1"):
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        blocks[:, :2], blocks[:, 2:4] = one, zero
        centre = 8 if kind == "Q4_1" else 16
        levels = np.rint(codec.dequantize_blocks(blocks)).astype(np.int16) - centre  # q - centre
        return _levels(kind, levels, d, m + centre * d, rows, k, 32)
    if kind in ("Q4_K", "Q5_K"):
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mins = quants.Q4_K.get_scale_min(blocks[:, 4:4 + quants.Q4_K.K_SCALE_SIZE].copy())  # [n, 8] each
        blocks[:, :2], blocks[:, 2:4] = one, zero
        scaled = codec.dequantize_blocks(blocks).reshape(n, 8, 32)  # sc * q
        sc = sc.astype(np.float32)
        q = np.rint(scaled / np.where(sc > 0, sc, 1)[..., None]).astype(np.int16)
        centre = 8 if kind == "Q4_K" else 16
        scale = d * sc  # [n, 8], as gguf computes it
        offset = -(dmin * mins.astype(np.float32)) + centre * scale
        return _levels(kind, (q - centre).reshape(n, 256), scale, offset, rows, k, 32)
    if kind == "Q6_K":
        d = blocks[:, -2:].copy().view(np.float16).astype(np.float32)  # [n, 1]
        sc = blocks[:, -18:-2].view(np.int8).astype(np.float32)  # [n, 16]
        blocks[:, -2:] = one
        scaled = codec.dequantize_blocks(blocks).reshape(n, 16, 16)  # sc * (q - 32)
        levels = np.rint(scaled / np.where(sc != 0, sc, 1)[..., None]).astype(np.int16)
        return _levels(kind, levels.reshape(n, 256), d * sc, None, rows, k, 16)
    raise ValueError(f"no exact repacking for GGUF type {kind}")


def _levels(kind: str, levels: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None, rows: int, k: int,
            sub: int) -> GGUFLevels:
    return GGUFLevels(kind, levels.reshape(rows, k), scales.reshape(rows, k // sub),
                      None if offsets is None else offsets.reshape(rows, k // sub), sub)


class GGUFIndex:
    """Which GGUF tensor row each dequantized row is, by hash; the tensors' levels decoded on demand."""

    def __init__(self, path) -> None:
        from gguf import GGUFReader, quants

        self._reader = GGUFReader(str(path))
        self._tensors = {}
        self._rows: dict[int, tuple[str, int]] = {}
        self._decoded: dict[str, GGUFLevels] = {}
        for tensor in self._reader.tensors:
            kind = tensor.tensor_type.name
            if kind not in GGUF_EXACT or len(tensor.shape) != 2:
                continue
            k, rows = (int(x) for x in tensor.shape)
            self._tensors[tensor.name] = (kind, tensor, rows, k)
            values = quants.dequantize(tensor.data, tensor.tensor_type).reshape(rows, k)
            for row, key in enumerate(_row_hashes(values).tolist()):
                self._rows.setdefault(key, (tensor.name, row))

    def find(self, weight: np.ndarray) -> list[tuple[str, int]] | None:
        """For a [K, N] weight, the (tensor, row) each of its N columns is, or None if any is not in the file."""
        columns = np.ascontiguousarray(weight.T)
        if columns.shape[1] % 2:
            return None
        found = [self._rows.get(key) for key in _row_hashes(columns).tolist()]
        return None if any(f is None for f in found) else found

    def levels(self, name: str) -> GGUFLevels:
        if name not in self._decoded:
            if len(self._decoded) > 2:  # bounded memory: tensors come in layer order
                self._decoded.pop(next(iter(self._decoded)))
            kind, tensor, rows, k = self._tensors[name]
            self._decoded[name] = gguf_levels(kind, tensor.data, rows, k)
        return self._decoded[name]


def repack_gguf(model: onnx.ModelProto, gguf_path, accuracy_level: int) -> tuple[list[str], int]:
    """Replace every MatMul whose weight's columns are all rows of the GGUF's quantized tensors by MatMulNBits
    holding those rows' own levels (and the block-sum offsets where the type has them). Returns one note per
    kind of weight and the number of MatMul weights found in no quantized tensor (they stay fp32)."""
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    users = _input_uses(graph)
    index = GGUFIndex(gguf_path)
    block_sums: dict = {}
    new_nodes: list[onnx.NodeProto] = []
    dropped: set[str] = set()
    counts: dict[tuple[str, int, int], int] = {}
    left = 0
    for node in graph.node:
        weight_name = node.input[1] if node.op_type == "MatMul" else None
        if weight_name not in inits or users[weight_name] != 1 or node.name.startswith("/streamgen/"):
            new_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[weight_name])
        found = index.find(weight) if weight.ndim == 2 and weight.dtype == np.float32 else None
        if found is None:
            left += 1
            new_nodes.append(node)
            continue
        k, n = weight.shape
        grid, kinds = _gather(index, found, weight)
        new_nodes += _exact_matmul(graph, node, weight_name, grid, k, n, grid.block, accuracy_level, block_sums)
        dropped.add(weight_name)
        label = "+".join(kinds)
        counts[(label, grid.bits, grid.block)] = counts.get((label, grid.bits, grid.block), 0) + 1
    if counts:
        _replace_nodes(model, new_nodes, dropped)
    notes = [f"{count} {label} weight(s) repacked exactly from the GGUF's blocks as {bits}-bit MatMulNBits, blocks "
             f"of {block} (no re-quantization)" for (label, bits, block), count in sorted(counts.items())]
    return notes, left


@dataclass(frozen=True, slots=True)
class _Packed:
    levels: np.ndarray  # uint8 [N, K / block, block], offset by the default zero point
    scales: np.ndarray  # float32 [N, K / block]
    offsets: np.ndarray | None  # float32 [N, K / block]
    bits: int
    block: int


def _gather(index: GGUFIndex, found: list[tuple[str, int]], weight: np.ndarray) -> tuple[_Packed, list[str]]:
    """The levels of a weight's columns, one GGUF row each, in one MatMulNBits layout: 4 bits when every column
    is a 4-bit type, else 8; blocks of 16 when a column has 16-long sub-blocks (Q6_K), else 32."""
    k, n = weight.shape
    rows = [(index.levels(name), row) for name, row in found]
    kinds = sorted({g.kind for g, _ in rows})
    bits = 4 if all(kind in _FOUR_BIT for kind in kinds) else 8
    block = min(g.sub for g, _ in rows)
    levels = np.empty((n, k), np.int16)
    scales = np.empty((n, k // block), np.float32)
    offsets = np.zeros((n, k // block), np.float32) if any(g.offsets is not None for g, _ in rows) else None
    for column, (g, row) in enumerate(rows):
        reps = g.sub // block
        levels[column] = g.levels[row]
        scales[column] = np.repeat(g.scales[row], reps)
        if g.offsets is not None:
            offsets[column] = np.repeat(g.offsets[row], reps)
    # What MatMulNBits computes with these must be the weight: levels * scale + offset, per block.
    rebuilt = (levels.reshape(n, k // block, block) * scales[..., None]
               + (0 if offsets is None else offsets[..., None])).reshape(n, k)
    tolerance = 1e-5 * max(float(np.abs(weight).max()), 1e-12)
    if float(np.abs(rebuilt - weight.T).max()) > tolerance:
        raise ValueError("a GGUF tensor's decoded levels do not rebuild the exported weight")
    stored = (levels + (1 << (bits - 1))).astype(np.uint8).reshape(n, k // block, block)
    return _Packed(stored, scales, offsets, bits, block), kinds
