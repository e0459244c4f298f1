"""Edits to the exported ONNX graph. Needs the `onnx` package (export extra).

- `keep_last_logits`: the lm_head only runs on the last position. Optimum's
  graph returns logits for every position, which during prefill costs
  S x vocab x hidden multiply-adds and a [B, S, V] copy to the host, for
  values generation never reads.
- `logits_at_positions` (the GroupQueryAttention graph): the lm_head runs on
  the positions the runner asks for, through a new input `logit_positions`
  [B, L] (indices into the pass's S new tokens): each row's own last token in
  a pass of right-padded prompts (engine/slots.py, `prefill_fresh`), the one
  new token of a decode step, and every token of a speculative verification
  pass (engine/speculation.py), which needs the logits after each proposed
  token. ONNX Runtime runs every node of a graph whatever outputs are asked
  for, so a second, all-positions output would cost every decode step a
  second lm_head; an input that says which positions costs nothing.
- `untie_lm_head`: with tied embeddings the lm_head weight is a Transpose of
  the embedding table, which the quantizers skip (they only quantize constant
  initializers). Giving the lm_head its own transposed copy lets them
  quantize it like every other MatMul.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from streamgen.model_files import LOGIT_POSITIONS  # the runner binds the positions by this name

_LAST_HIDDEN = "/streamgen/last_hidden"
_CHOSEN = "/streamgen/chosen_hidden"
_UNTIED_WEIGHT = "streamgen.lm_head.weight"


# Elementwise steps a family puts between the lm_head and the logits: Gemma 2's soft-cap, c * tanh(x / c).
_LOGIT_CAP_OPS = ("Div", "Tanh", "Mul")


def _lm_head(graph: onnx.GraphProto) -> onnx.NodeProto:
    """The lm_head's MatMul: the node the logits come from, or the one a soft-cap (Div, Tanh, Mul by constants)
    on top of it reads."""
    producers = {out: node for node in graph.node for out in node.output}
    node, seen = producers.get("logits"), []
    if node is None:
        raise ValueError("the graph has no 'logits' output")
    while node.op_type in _LOGIT_CAP_OPS and len(seen) < len(_LOGIT_CAP_OPS):
        seen.append(node.op_type)
        computed = [name for name in node.input if name in producers and producers[name].op_type != "Constant"]
        if len(computed) != 1:
            break
        node = producers[computed[0]]
    if node.op_type != "MatMul":
        through = f" (through {' <- '.join(seen)})" if seen else ""
        raise ValueError(f"expected the logits to come from a MatMul{through}, found {node.op_type}")
    return node


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


def _feed_lm_head(graph: onnx.GraphProto, head: onnx.NodeProto, nodes: list[onnx.NodeProto], hidden: str,
                  length: int | str = 1) -> None:
    """Insert nodes right before the lm_head (the node list stays topologically sorted), feed it `hidden`, and
    declare the logits `length` positions long (a number, or a named dimension)."""
    head.input[0] = hidden
    index = list(graph.node).index(head)
    for node in reversed(nodes):
        graph.node.insert(index, node)
    for output in graph.output:
        if output.name == "logits":
            dim = output.type.tensor_type.shape.dim[1]
            if isinstance(length, int):
                dim.ClearField("dim_param")
                dim.dim_value = length
            else:
                dim.ClearField("dim_value")
                dim.dim_param = length


def logits_at_positions(model: onnx.ModelProto) -> bool:
    """Feed the lm_head hidden[b, logit_positions[b, l]] for each row b and each asked position l: logits
    [B, L, V]. Replaces the slice to the last position that the export made. Returns False if already done."""
    graph = model.graph
    head = _lm_head(graph)
    if head.input[0] == _CHOSEN:
        return False
    producers = {out: node for node in graph.node for out in node.output}
    last = producers.get(head.input[0])
    if last is None or last.op_type != "Slice":
        raise ValueError("expected the lm_head's input to be sliced to the last position")
    hidden = last.input[0]  # [B, S, H]
    graph.input.append(helper.make_tensor_value_info(LOGIT_POSITIONS, onnx.TensorProto.INT64,
                                                     ["batch_size", "num_logits"]))
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), "/streamgen/last_axis"))
    nodes = [
        helper.make_node("Unsqueeze", [LOGIT_POSITIONS, "/streamgen/last_axis"], ["/streamgen/logit_index"],
                         name="/streamgen/LogitIndex"),  # [B, L, 1]
        helper.make_node("GatherND", [hidden, "/streamgen/logit_index"], [_CHOSEN], batch_dims=1,
                         name="/streamgen/LogitPositions"),  # [B, L, H]
    ]
    _feed_lm_head(graph, head, nodes, _CHOSEN, "num_logits")
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
