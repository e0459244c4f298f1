"""Edits to the exported ONNX graph. Needs the `onnx` package (export extra).

- `keep_last_logits`: the lm_head only runs on the last position. Optimum's
  graph returns logits for every position, which during prefill costs
  S x vocab x hidden multiply-adds and a [B, S, V] copy to the host, for
  values generation never reads.
- `logits_at_last_token` (the GroupQueryAttention graph): the same, but at
  each row's own last token. Prompts of several empty rows run in one pass
  (engine/slots.py, `prefill_fresh`), right-padded to the longest, so a
  shorter row's last token is not the pass's last position. Its index is
  min(S, the row's mask sum) - 1: in that pass the mask covers each row's
  tokens only, so the sum is its prompt length; in every other pass (a decode,
  or a chunk on top of a past) the sum is at least S, which is the last position.
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
_LAST_TOKEN = "/streamgen/last_token_hidden"
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
    _feed_lm_head(graph, head, [slice_node], _LAST_HIDDEN)
    return True


def _feed_lm_head(graph: onnx.GraphProto, head: onnx.NodeProto, nodes: list[onnx.NodeProto], hidden: str) -> None:
    """Insert nodes right before the lm_head (the node list stays topologically sorted), feed it `hidden`, and
    declare the logits one position long."""
    head.input[0] = hidden
    index = list(graph.node).index(head)
    for node in reversed(nodes):
        graph.node.insert(index, node)
    for output in graph.output:
        if output.name == "logits":
            output.type.tensor_type.shape.dim[1].ClearField("dim_param")
            output.type.tensor_type.shape.dim[1].dim_value = 1


def logits_at_last_token(model: onnx.ModelProto) -> bool:
    """Feed the lm_head each row's last token: hidden[b, min(S, sum(mask[b])) - 1]. Replaces the slice to
    the last position that the export made (or keep_last_logits). Returns False if already done."""
    graph = model.graph
    head = _lm_head(graph)
    if head.input[0] == _LAST_TOKEN:
        return False
    producers = {out: node for node in graph.node for out in node.output}
    last = producers.get(head.input[0])
    if last is None or last.op_type != "Slice":
        raise ValueError("expected the lm_head's input to be sliced to the last position")
    hidden = last.input[0]  # [B, S, H]
    consts = {"/streamgen/one": [1], "/streamgen/seq_axis": [1]}
    for name, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", "/streamgen/seq_axis"], ["/streamgen/mask_sum"],
                         keepdims=1, name="/streamgen/MaskSum"),  # [B, 1]
        helper.make_node("Shape", ["input_ids"], ["/streamgen/new_len"], start=1, end=2,
                         name="/streamgen/NewTokens"),  # [1]: S
        helper.make_node("Min", ["/streamgen/mask_sum", "/streamgen/new_len"], ["/streamgen/count"],
                         name="/streamgen/RowTokens"),
        helper.make_node("Sub", ["/streamgen/count", "/streamgen/one"], ["/streamgen/last_index"],
                         name="/streamgen/LastIndex"),  # [B, 1]
        helper.make_node("GatherND", [hidden, "/streamgen/last_index"], ["/streamgen/last_rows"], batch_dims=1,
                         name="/streamgen/LastToken"),  # [B, H]
        helper.make_node("Unsqueeze", ["/streamgen/last_rows", "/streamgen/seq_axis"], [_LAST_TOKEN],
                         name="/streamgen/LastTokenRow"),  # [B, 1, H]
    ]
    _feed_lm_head(graph, head, nodes, _LAST_TOKEN)
    if not any(last.output[0] in node.input for node in graph.node):
        graph.node.remove(last)
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
