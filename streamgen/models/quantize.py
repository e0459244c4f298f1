"""Weight quantization with ONNX Runtime's own quantizers. Export extra only.

Both use ONNX Runtime's MatMulNBits quantizer (symmetric, accuracy_level
4 = int8 compute on CPU): int8 with 8-bit weights in blocks of 64, int4
with 4-bit weights in blocks of 32. Dynamic int8 quantization
(quantize_dynamic on MatMul, per tensor or per channel) was measured first
and rejected: on the default model
it cost 11-22 % perplexity and turned the greedy answers to "What is the
capital of Germany?" and "... of France?" into French and German; 8-bit
block-wise weights are within 1 % of fp32 (docs/benchmarks.md).

`source` re-quantizes nothing: when the source checkpoint was itself a GGUF
(the default model is Q4_1 with a Q8_0 embedding), its weights are repacked
bit-exactly into MatMulNBits (models/repack.py), so the build computes with
the source's own levels. It exists only for such sources.

All of them first untie the lm_head (models/graph.py) so that the largest single
matrix of a small tied-embedding model is quantized too instead of staying
fp32; the embedding table itself stays fp32 because it is a Gather, not a
MatMul.
"""

from __future__ import annotations

from pathlib import Path

# accuracy_level 4 = int8 activations inside MatMulNBits: the fast CPU path.
ACCURACY_LEVEL = 4
BITS = {"int8": 8, "int4": 4}
# Weights per scale. 8-bit levels are fine enough for blocks of 64: against
# blocks of 32 that is 1.1-1.2x the batch-16 speed (about the same at batch 1)
# for perplexity within 1 % of fp32 either way. Blocks of 128 are faster still
# but not batch-invariant: ORT's kernel for several rows then computes
# differently from its one-row kernel, and a request's logits would depend on
# who it shares a step with. 4-bit needs the small blocks.
# (`streamgen bench variants`, docs/benchmarks.md)
BLOCK_SIZES = {"int8": 64, "int4": 32}
SOURCE = "source"  # repack the source's own GGUF grid, re-quantize nothing
# The builds `pull` makes and the alternatives they were chosen over (`streamgen bench variants` measures
# them all): name -> (build label, keyword arguments of quantize_model); no arguments = what `pull` makes.
VARIANTS: dict[str, tuple[str, dict]] = {
    "fp32": ("none", {}),
    "fp16": ("none-fp16", {}),  # a build label (model_files.Build): pulled like any build
    "fp32 with int8 KV": ("none-kvint8", {}),
    "int8": ("int8", {}),  # blocks of 64
    "int8 with first+last layers fp32": ("int8", {"keep_fp32": ("/layers.0/", "/layers.29/")}),
    "int8 with lm_head+first+last layers fp32": ("int8", {"keep_fp32": ("/lm_head/", "/layers.0/", "/layers.29/")}),
    "int8 block 32": ("int8", {"block_size": 32}),
    "int8 block 128": ("int8", {"block_size": 128}),
    "int8 fp32 activations": ("int8", {"accuracy_level": 1}),
    "int4": ("int4", {}),
    "int4 asymmetric": ("int4", {"symmetric": False}),
    "source": ("source", {}),
    "source fp32 activations": ("source", {"accuracy_level": 1}),
}


def quantize_model(src: Path, dst: Path, method: str, **options) -> list[str]:
    """Write a quantized copy of src to dst (`bench variants`); returns notes for the manifest."""
    import onnx

    from streamgen.models.export import save_model

    model, notes = quantize_graph(onnx.load(str(src)), method, **options)
    save_model(model, dst)
    return notes


def quantize_graph(model, method: str, *, block_size: int | None = None, accuracy_level: int = ACCURACY_LEVEL,
                   symmetric: bool = True, keep_fp32: tuple[str, ...] = (), gguf: Path | None = None):
    """Quantize an ONNX model's MatMul weights; returns the new model and notes for the manifest.

    gguf: the file the model was converted from, whose own blocks `source` reads (models/repack.py). The other
    keyword arguments are what `pull` never changes; `bench variants` uses them to measure the alternatives the
    defaults were chosen over."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from streamgen.models.graph import untie_lm_head

    if method not in BITS and method != SOURCE:
        raise ValueError(f"unknown quantization {method!r}")
    notes = []
    if untie_lm_head(model):
        notes.append("lm_head untied from the embedding so it is quantized too")
    if method == SOURCE:
        return model, notes + _repack_source(model, accuracy_level, gguf)
    block_size = block_size or BLOCK_SIZES[method]
    kept = [n.name for n in model.graph.node if n.op_type == "MatMul" and any(k in n.name for k in keep_fp32)]
    quantizer = MatMulNBitsQuantizer(
        model, bits=BITS[method], block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level,
        nodes_to_exclude=kept,
    )
    quantizer.process()
    notes.append(f"{method}: onnxruntime MatMulNBits, {BITS[method]}-bit weights, "
                 f"{'symmetric' if symmetric else 'asymmetric'}, block {block_size}, accuracy_level {accuracy_level}"
                 + (f"; {len(kept)} MatMul(s) kept fp32" if kept else ""))
    return quantizer.model.model, notes


def _repack_source(model, accuracy_level: int, gguf: Path | None = None) -> list[str]:
    from streamgen.errors import PullError
    from streamgen.models.repack import GGUF_EXACT, repack_exact, repack_gguf

    # Q4_1 and Q8_0 grids are recognised from the values (4 bits for Q4_1 levels; Q8_0 weights keep 8:
    # repack_exact never narrows); whatever else the GGUF holds is read from its own blocks.
    notes = repack_exact(model, bits=4, accuracy_level=accuracy_level)
    if gguf is not None:
        notes += repack_gguf(model, gguf, accuracy_level)[0]
    if not notes:
        raise PullError("--quantize source needs a source whose weights are already on a GGUF grid (a GGUF file or "
                        f"a packaged GGUF: {', '.join(GGUF_EXACT)}; or Q4_1 / Q8_0 levels in the weights); this one "
                        "is not. Use --quantize int8 or int4.")
    left = sum(1 for node in model.graph.node if node.op_type == "MatMul" and not node.name.startswith("/streamgen/")
               and not node.name.endswith("/ExactOffset"))
    if left:
        notes.append(f"{left} MatMul weight(s) not on a grid stay fp32")
    notes.append(f"source: accuracy_level {accuracy_level}; per-block offsets (Q4_1, Q4_K, Q5_1, Q5_K) applied to "
                 "block sums in fp32")
    return notes
