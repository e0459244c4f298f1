"""Edits to the exported ONNX graph. Needs the `onnx` package (export extra).

- `keep_last_logits`: the lm_head only runs on the last position. Optimum's
  graph returns logits for every position, which during prefill costs
  S x vocab x hidden multiply-adds and a [B, S, V] copy to the host, for
  values generation never reads.
- `untie_lm_head`: with tied embeddings the lm_head weight is a Transpose of
  the embedding table, which the quantizers skip (they only quantize constant
  initializers). Giving the lm_head its own transposed copy lets them
  quantize it like every other MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

_LAST_HIDDEN = "/streamgen/last_hidden"
_UNTIED_WEIGHT = "streamgen.lm_head.weight"


def _lm_head(graph: onnx.GraphProto) -> onnx.NodeProto:
    for node in graph.node:
        if "logits" in node.output:
            if node.op_type != "MatMul":
                raise ValueError(f"expected the logits to come from a MatMul, found {node.op_type}")
            return node
    raise ValueError("the graph has no 'logits' output")


def keep_last_logits(model: onnx.ModelProto) -> bool:
    """Slice the lm_head's input to the last position. Returns False if already done."""
    graph = model.graph
    head = _lm_head(graph)
    if head.input[0] == _LAST_HIDDEN:
        return False
    consts = {
        "/streamgen/last_starts": [-1],
        "/streamgen/last_ends": [np.iinfo(np.int64).max],
        "/streamgen/last_axes": [1],
    }
    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    slice_node = helper.make_node(
        "Slice", [head.input[0], *consts], [_LAST_HIDDEN], name="/streamgen/LastPosition"
    )
    head.input[0] = _LAST_HIDDEN
    # Insert right before the lm_head so the node list stays topologically sorted.
    index = list(graph.node).index(head)
    graph.node.insert(index, slice_node)
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[1].ClearField("dim_param")
            output.type.tensor_type.shape.dim[1].dim_value = 1
    return True


def untie_lm_head(model: onnx.ModelProto) -> bool:
    """Replace Transpose(embedding) feeding the lm_head by its own initializer."""
    graph = model.graph
    head = _lm_head(graph)
    producers = {out: node for node in graph.node for out in node.output}
    weight_input = head.input[1]
    inits = {init.name: init for init in graph.initializer}
    if weight_input in inits:
        return False  # already a constant of its own
    transpose = producers.get(weight_input)
    if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in inits:
        raise ValueError("the lm_head weight is neither an initializer nor a Transpose of one")
    table = numpy_helper.to_array(inits[transpose.input[0]])  # [V, H]
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(table.T), _UNTIED_WEIGHT))  # [H, V]
    head.input[1] = _UNTIED_WEIGHT
    still_used = any(weight_input in node.input for node in graph.node)
    if not still_used:
        graph.node.remove(transpose)
    return True
