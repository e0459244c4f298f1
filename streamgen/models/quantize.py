"""Weight quantization with ONNX Runtime's own quantizers. Export extra only.

- int8: dynamic quantization of every MatMul (weights int8 per output channel,
  activations quantized on the fly).
- int4: MatMulNBits, symmetric, block 32 (the block size measured in the
  field notes), with int8 compute on CPUs that support it.

Both first untie the lm_head (models/graph.py) so that the largest single
matrix of a small tied-embedding model is quantized too instead of staying
fp32; the embedding table itself stays fp32 because it is a Gather, not a
MatMul.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

BLOCK_SIZE = 32
# accuracy_level 4 = int8 activations inside MatMulNBits: the fast CPU path.
INT4_ACCURACY_LEVEL = 4


def quantize_model(src: Path, dst: Path, method: str) -> list[str]:
    """Write a quantized copy of src to dst. Returns notes for the manifest."""
    import onnx

    from streamgen.models.graph import untie_lm_head

    model = onnx.load(str(src))
    notes = []
    if untie_lm_head(model):
        notes.append("lm_head untied from the embedding so it is quantized too")
    if method == "int8":
        _int8(model, dst)
        notes.append("int8: onnxruntime quantize_dynamic, MatMul weights QInt8 per output channel")
    elif method == "int4":
        _int4(model, dst)
        notes.append(f"int4: onnxruntime MatMulNBits, symmetric, block {BLOCK_SIZE}, accuracy_level {INT4_ACCURACY_LEVEL}")
    else:
        raise ValueError(f"unknown quantization {method!r}")
    return notes


def _int8(model, dst: Path) -> None:
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from streamgen.models.export import save_model

    # quantize_dynamic wants a path or an in-memory model; a temporary
    # file keeps large-model handling in one place (save_model).
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        untied = Path(tmp) / "untied.onnx"
        save_model(model, untied)
        # It logs a generic "consider pre-processing" advice on the root logger
        # on every call; shape inference pre-processing does not apply here.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(untied, dst, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=True)
        finally:
            root.setLevel(level)


def _int4(model, dst: Path) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from streamgen.models.export import save_model

    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL
    )
    quantizer.process()
    save_model(quantizer.model.model, dst)
