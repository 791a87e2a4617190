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

The float weights are dropped from the proto as they are replaced, so the graph is held once.
Anything else (Conv, Gemm, a weight computed in the graph) goes to onnxruntime's quantiser.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SUFFIX = "_quantized"
MIN_OPSET = 11  # DynamicQuantizeLinear


def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def supported(model: Any, nodes: list[str]) -> bool:
    """True when every node in ``nodes`` is a MatMul of a tensor by a 2-D float32 initializer and
    the graph's default-domain opset has DynamicQuantizeLinear."""
    from onnx import TensorProto

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        return False
    inits = _initializers(model)
    by_name = {n.name: n for n in model.graph.node}
    for name in nodes:
        node = by_name.get(name)
        if node is None or node.op_type != "MatMul" or len(node.input) != 2:
            return False
        weight = inits.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            return False
    return bool(nodes)


def quantize_matmuls(src: Path, dst: Path, nodes: list[str]) -> None:
    """Write ``src`` to ``dst`` with the MatMuls named in ``nodes`` dynamic int8 (see the module
    docstring); the caller checked ``supported``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.quant_utils import quantize_data

    model = onnx.load(str(src))
    graph = model.graph
    inits = _initializers(model)
    chosen = set(nodes)
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1

    quantized_weights: set[str] = set()
    quantized_inputs: set[str] = set()
    new_nodes = []
    for node in graph.node:
        if node.name not in chosen:
            new_nodes.append(node)
            continue
        x, w = node.input
        if w not in quantized_weights:
            weight = inits[w]
            zero_point, scale, q = quantize_data(numpy_helper.to_array(weight).flatten(), TensorProto.INT8, True)
            graph.initializer.extend([
                numpy_helper.from_array(q.reshape(tuple(weight.dims)).astype(np.int8), w + SUFFIX),
                helper.make_tensor(w + "_scale", TensorProto.FLOAT, [], scale.reshape(-1).tolist()),
                helper.make_tensor(w + "_zero_point", TensorProto.INT8, [], zero_point.reshape(-1).tolist()),
            ])
            quantized_weights.add(w)
        users[w] -= 1
        if users[w] == 0:  # no float user left: free the float weight now, not at the end
            graph.initializer.remove(inits.pop(w))
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
                             to=TensorProto.FLOAT, name=node.name + "_quant_output_scale_cast"),
            helper.make_node("Mul", [y + "_output_quantized_cast_output", scales], [y],
                             name=node.name + "_quant_output_scale_mul"),
        ]
    del graph.node[:]
    graph.node.extend(new_nodes)
    onnx.save(model, str(dst))
