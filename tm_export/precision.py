"""Reduced-precision variants of exported graphs (fp16 weights and math, fp32 where fp16 breaks).

Normalisations and softmax stay in fp32: their reductions overflow or lose too much precision in
fp16 (LayerNorm/GroupNorm variance, softmax of large logits). Inputs and outputs stay float32 so the
runtime and the manifest's I/O contract do not change with the precision.
"""
from __future__ import annotations

import onnx

PRECISIONS = ("fp32", "fp16", "int8")  # int8: see quantize.py
# Ops kept in fp32 on top of onnxruntime's own list (which keeps e.g. Range, Resize, TopK in fp32).
FP32_OPS = ("LayerNormalization", "Softmax", "InstanceNormalization", "GroupNormalization",
            "ReduceMean", "Pow", "Sqrt", "Erf", "Exp")
# Relative tolerance of an fp16 graph against the fp32 PyTorch reference.
FP16_MAX_REL_ERROR = 1e-2


def check_precision(precision: str) -> str:
    if precision == "bf16":
        raise ValueError("bf16 graphs are not supported yet: ONNX Runtime's CPU provider cannot run them, so "
                         "they could not be validated here; use fp16 (or fp32), or fp32 graphs on OpenVINO with "
                         "backend_options={'precision': 'bf16'}")
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def to_fp16(model: onnx.ModelProto, shapes_inferred: bool = False) -> onnx.ModelProto:
    """``shapes_inferred``: the model's value_info is complete already (``onnx.shape_inference``),
    so the converter need not run it on the model with all its weights (several copies of them)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    block = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP32_OPS))
    return convert_float_to_float16(_outputs_from_nodes(model), keep_io_types=True, op_block_list=block,
                                    disable_shape_infer=shapes_inferred)


def _outputs_from_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every graph output that is a bare initializer an Identity node of its own.

    When an output is constant (e.g. a patch embedding's position embedding, folded at export), the
    converter casts the fp16 initializer back to an fp32 output of the same name, and the graph then
    defines that name twice: ONNX Runtime refuses to load it.
    """
    initializers = {init.name: init for init in model.graph.initializer}
    for output in model.graph.output:
        if output.name in initializers:
            constant = f"{output.name}_constant"
            initializers[output.name].name = constant
            model.graph.node.append(onnx.helper.make_node("Identity", [constant], [output.name],
                                                          name=f"{output.name}_from_constant"))
    return model
