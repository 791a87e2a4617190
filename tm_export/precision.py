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
    converted = convert_float_to_float16(_outputs_from_nodes(model), keep_io_types=True, op_block_list=block,
                                         node_block_list=sorted(sinusoidal_embedding_nodes(model)),
                                         disable_shape_infer=shapes_inferred)
    return drop_fp16_round_trips(drop_duplicate_nodes(converted))


def drop_duplicate_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep one of several identical nodes (same name, op, inputs, outputs and attributes).

    onnxruntime's converter before 1.32 inserts one Cast per consumer when two kept-fp32 nodes read
    the same fp16 value, all with the same name and output: ONNX Runtime then refuses the graph
    ("two nodes with same node name"); onnxruntime-gpu 1.31 does this to the decoder.
    """
    seen: set[bytes] = set()
    kept = []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:  # the first keeps its place: the order of the rest is unchanged
            seen.add(key)
            kept.append(node)
    if len(kept) < len(model.graph.node):
        kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in kept]
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return model


def drop_fp16_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the Cast(fp32 -> fp16) -> Cast(fp16 -> fp32) pairs the converter puts between two fp32 nodes.

    onnxruntime's converter casts every output of a kept-fp32 node to fp16 and back when the next
    node is kept fp32 as well, so a chain of fp32 nodes is still rounded to fp16 between its links
    (the timestep phases t * freq, up to ~1000, lose 0.25 rad that way). Every such pair goes, not only
    the timestep's: e.g. a Pow -> ReduceMean chain of a norm is no longer rounded in between either
    (only more precise). The second Cast becomes an Identity of the fp32 value; a first Cast left
    without consumers is deleted (TerraMind graphs have no If/Loop subgraphs that could read it).
    """
    float_values = {v.name for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]
                    if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    float_values |= {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}

    def cast_to(node: onnx.NodeProto) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        first = producer.get(node.input[0]) if node.input else None
        if (cast_to(node) == onnx.TensorProto.FLOAT and first is not None
                and cast_to(first) == onnx.TensorProto.FLOAT16 and first.input[0] in float_values):
            node.op_type = "Identity"
            node.input[0] = first.input[0]
            del node.attribute[:]
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    dead = [node for node in model.graph.node
            if cast_to(node) == onnx.TensorProto.FLOAT16 and not any(out in used for out in node.output)]
    for node in dead:
        model.graph.node.remove(node)
    return model


def sinusoidal_embedding_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes from an integer graph input (the diffusion timestep) to a Sin/Cos, both included.

    The UNet's timestep embedding is sin/cos(t * freq) with t up to 999: in fp16 the product is
    rounded to 0.5 near 1000, so the phases, and with them the whole denoising step, drift with t
    (max error 1e-3 of the output at t=1, 1.3e-2 at t=999). Kept in fp32, the error stays flat.
    Nodes merely downstream of the input (e.g. a token-id Gather) are not affected: only those on
    a path that ends in a Sin or Cos. Unnamed nodes of ``model`` are given names in place (the
    converter's block list goes by name).
    """
    int_types = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    starts = {i.name for i in model.graph.input if i.type.tensor_type.elem_type in int_types}
    for index, node in enumerate(model.graph.node):  # the converter's block list goes by node name
        if not node.name:
            node.name = f"tm_unnamed_{node.op_type}_{index}"
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    # Forward from the integer inputs, stopping at Sin/Cos; remember each node's predecessors on the way.
    reached: dict[str, onnx.NodeProto] = {}
    parents: dict[str, set[str]] = {}
    frontier = [(None, name) for name in starts]
    while frontier:
        parent, value = frontier.pop()
        for node in consumers.get(value, []):
            parents.setdefault(node.name, set()).update({parent} if parent else set())
            if node.name in reached:
                continue
            reached[node.name] = node
            if node.op_type not in ("Sin", "Cos"):
                frontier += [(node.name, out) for out in node.output]
    # Back from the Sin/Cos reached: only the nodes that lead to them.
    keep: set[str] = set()
    stack = [name for name, node in reached.items() if node.op_type in ("Sin", "Cos")]
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack += list(parents.get(name, ()))
    # Only a cheap elementwise path is worth fp32: one through weights is something else; leave it fp16.
    if any(reached[name].op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose") for name in keep):
        return set()
    return keep


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
