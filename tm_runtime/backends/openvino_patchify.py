"""Patchifying convolutions rewritten as MatMuls, for OpenVINO's bf16 CPU path.

OpenVINO 2026.4.1 computes a convolution whose kernel equals its stride (a patch embedding: 16x16,
stride 16) wrongly in bf16 on AMX when it has 4 to 16 input channels (its oneDNN kernel
``brgconv_avx512_amx_bf16``; output cosine ~0 against f32). The same arithmetic as a MatMul over
the flattened patches goes through OpenVINO's FullyConnected kernels, which are right in bf16.

The rewrite is exact in f32 (the same sums, in another order): each patch (C, kh, kw) becomes one row
of length C*kh*kw, multiplied by the kernel flattened the same way; the result is transposed back to
the convolution's (B, D, h, w), so the rest of the graph is untouched.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _patchify_shape(op: Any) -> tuple[np.ndarray, int, int] | None:
    """(kernel (D, C, kh, kw), h, w) when ``op`` is a patchifying convolution we can rewrite
    (kernel = stride > 1, no padding or dilation, static height and width)."""
    if op.get_type_name() != "Convolution":
        return None
    weight = op.input_value(1).get_node()
    if weight.get_type_name() != "Constant":
        return None
    kernel = weight.get_data()
    if kernel.ndim != 4:
        return None
    attrs = op.get_attributes()
    kh, kw = kernel.shape[2:]
    if (kh * kw == 1 or list(attrs["strides"]) != [kh, kw] or any(attrs["pads_begin"]) or any(attrs["pads_end"])
            or any(d != 1 for d in attrs["dilations"])):
        return None
    shape = op.input(0).get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:
        return None
    height, width = shape[2], shape[3]
    if height.is_dynamic or width.is_dynamic or height.get_length() % kh or width.get_length() % kw:
        return None
    return kernel, height.get_length() // kh, width.get_length() // kw


def rewrite_patchify_convolutions(model: Any) -> list[str]:
    """Replace every patchifying convolution of an ``openvino.Model`` in place; returns their names."""
    import openvino.opset13 as ops

    def const(values: list[int]) -> Any:
        return ops.constant(np.array(values, dtype=np.int64))

    replaced = []
    for op in model.get_ordered_ops():
        found = _patchify_shape(op)
        if found is None:
            continue
        kernel, h, w = found
        dim, channels, kh, kw = kernel.shape
        # (B, C, h*kh, w*kw) -> (B, h, w, C, kh, kw) -> (B, h*w, C*kh*kw); 0 copies the batch dim.
        patches = ops.reshape(op.input_value(0), const([0, channels, h, kh, w, kw]), special_zero=True)
        patches = ops.transpose(patches, const([0, 2, 4, 1, 3, 5]))
        patches = ops.reshape(patches, const([0, h * w, channels * kh * kw]), special_zero=True)
        weight = np.ascontiguousarray(kernel.reshape(dim, -1).T)
        projected = ops.matmul(patches, ops.constant(weight), False, False)
        grid = ops.reshape(projected, const([0, h, w, dim]), special_zero=True)
        out = ops.transpose(grid, const([0, 3, 1, 2]))
        out.set_friendly_name(op.get_friendly_name())
        op.output(0).replace(out.output(0))
        replaced.append(op.get_friendly_name())
    if replaced:
        model.validate_nodes_and_infer_types()
    return replaced
