"""Dynamic int8 MatMuls, written without onnxruntime's copies of the graph.

``onnxruntime.quantization.quantize_dynamic`` holds the float graph up to three times while it
works (it reloads the model with inferred shapes twice and keeps the caller's copy): quantising
the base encoder (340 MB) took 1.6 GB on top of the exporter, and pushed int8 task exports past
the export-memory bound. For graphs whose chosen nodes are all MatMuls with a constant 2-D float
weight (the encoders and decoders), this module writes the same graph onnxruntime would: per
weight ``quant_utils.quantize_data`` (onnxruntime's own arithmetic: int8, symmetric, per tensor),
and per node the pattern onnxruntime emits and its optimiser fuses into ``MatMulIntegerToFloat``::

    DynamicQuantizeLinear(x) -> x_q, x_scale, x_zp        (once per input tensor)
    MatMulInteger(x_q, w_q, x_zp, w_zp) -> Cast(float) -> Mul(., x_scale * w_scale)

The result has the same nodes and initializers as onnxruntime's (their order and the file's
metadata aside) and gives bitwise-equal outputs; the float graph is held once (reading the file
costs its bytes plus the parsed proto, ~2x the file, the peak; onnxruntime's reached 3.4-4.1x).
Anything else (Conv, Gemm, a weight computed in the graph or read by other nodes too) goes to
onnxruntime's quantiser.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SUFFIX = "_quantized"
MIN_OPSET = 11  # DynamicQuantizeLinear


def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def _new_names(x: str, w: str, node: Any) -> list[str]:
    y = node.output[0]
    return [x + SUFFIX, x + "_scale", x + "_zero_point", w + SUFFIX, w + "_scale", w + "_zero_point",
            node.name + "_quant_scales_mul:0", y + "_output_quantized", y + "_output_quantized_cast_output"]


def supported(model: Any, nodes: list[str]) -> bool:
    """True when this module writes what onnxruntime would: every node in ``nodes`` is a uniquely
    named MatMul of a computed tensor by a 2-D float32 initializer that nothing else reads (no
    other node, graph input or output, subgraph), no generated name is taken, and the opset has
    DynamicQuantizeLinear. Otherwise onnxruntime's quantiser is the one to use."""
    from onnx import TensorProto

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET or not nodes or any(a.type in (5, 10) for n in graph.node for a in n.attribute):
        return False  # (attribute types GRAPH / GRAPHS: subgraphs may read a weight too)
    inits = _initializers(model)
    names = [n.name for n in graph.node]
    by_name = {n.name: n for n in graph.node}
    chosen = set(nodes)
    if "" in chosen or any(names.count(name) != 1 for name in chosen):
        return False
    taken = {t for n in graph.node for t in (*n.input, *n.output)} | set(inits) | set(names)
    interface = {v.name for v in (*graph.input, *graph.output)}
    for name in chosen:
        node = by_name[name]
        if node.op_type != "MatMul" or len(node.input) != 2:
            return False
        x, w = node.input
        weight = inits.get(w)
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2 or x in inits:
            return False
        if w in interface or any(w in n.input for n in graph.node if n.name not in chosen):
            return False
        if any(t in taken for t in _new_names(x, w, node)):
            return False
    return True


def quantize_matmuls(src: Path | Any, dst: Path, nodes: list[str]) -> None:
    """Write ``src`` (a path, or a loaded model with its weights, which is rewritten) to ``dst``
    with the MatMuls named in ``nodes`` dynamic int8 (see the module docstring); the caller checked
    ``supported``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import quantize_data

    model = onnx.load(str(src)) if isinstance(src, (str, Path)) else src
    graph = model.graph
    inits = _initializers(model)
    chosen = set(nodes)
    quantized_weights: set[str] = set()
    quantized_inputs: set[str] = set()
    new_nodes, int8_weights = [], []
    for node in graph.node:
        if node.name not in chosen:
            new_nodes.append(node)
            continue
        x, w = node.input
        if w not in quantized_weights:
            weight = inits[w]
            zero_point, scale, q = quantize_data(numpy_helper.to_array(weight).flatten(), TensorProto.INT8, True)
            int8_weights += [
                numpy_helper.from_array(q.reshape(tuple(weight.dims)).astype(np.int8), w + SUFFIX),
                helper.make_tensor(w + "_scale", TensorProto.FLOAT, [], scale.reshape(-1).tolist()),
                helper.make_tensor(w + "_zero_point", TensorProto.INT8, [], zero_point.reshape(-1).tolist()),
            ]
            quantized_weights.add(w)
        if x not in quantized_inputs:
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [x + SUFFIX, x + "_scale", x + "_zero_point"],
                                              name=x + "_QuantizeLinear"))
            quantized_inputs.add(x)
        y = node.output[0]
        scales = node.name + "_quant_scales_mul:0"
        new_nodes += [
            helper.make_node("Mul", [x + "_scale", w + "_scale"], [scales], name=node.name + "_quant_scales_mul"),
            helper.make_node("MatMulInteger", [x + SUFFIX, w + SUFFIX, x + "_zero_point", w + "_zero_point"],
                             [y + "_output_quantized"], name=node.name + "_quant"),
            helper.make_node("Cast", [y + "_output_quantized"], [y + "_output_quantized_cast_output"],
                             to=TensorProto.FLOAT, name=y + "_output_quantized_cast"),
            helper.make_node("Mul", [y + "_output_quantized_cast_output", scales], [y],
                             name=node.name + "_quant_output_scale_mul"),
        ]
    # Only the chosen MatMuls read these weights (``supported``): drop them all, in one rebuild.
    kept = [init for init in graph.initializer if init.name not in quantized_weights]
    del graph.initializer[:]
    graph.initializer.extend(kept + int8_weights)
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.save(model, str(dst))
