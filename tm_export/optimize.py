"""A CPU-tuned copy of an export: each encoder self-attention fused into one
``com.microsoft.Attention`` node (ONNX Runtime contrib op).

The traced graph spells attention as qkv MatMul -> 3 Slices -> Reshape/Transpose per head ->
MatMul -> Mul(scale) -> Softmax -> MatMul -> Transpose/Reshape, plus the Shape/Gather/Concat
nodes that compute the dynamic reshape targets: about 35 nodes per layer, each a thread-pool
round trip. The fused node does the same arithmetic (same weights, same scale, fp32) in one
kernel. ``onnxruntime.transformers.optimizer`` does not recognise this pattern (it fuses no
Attention here) and its SkipLayerNormalization made the tiny encoder slower, hence this pass.

The result is ONNX Runtime-only (contrib op), so it is written as a *separate* export
directory; the portable graph stays the default.

    python -m tm_export.optimize SRC_EXPORT_DIR --out DST_EXPORT_DIR
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from tm_runtime.manifest import MANIFEST_NAME, load_manifest, sha256_file

CONTRIB_DOMAIN = "com.microsoft"


class OptimizeError(RuntimeError):
    """The graph does not have the attention pattern this pass expects."""


@dataclass
class _Graph:
    """Producer / consumer / constant lookups over an ONNX graph."""

    model: onnx.ModelProto

    def __post_init__(self) -> None:
        g = self.model.graph
        self.producer = {out: n for n in g.node for out in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for inp in n.input:
                self.consumers.setdefault(inp, []).append(n)
        self.initializers = {t.name: t for t in g.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only(self, name: str, op_type: str) -> onnx.NodeProto:
        """The producer of ``name``, which must be an ``op_type`` node."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            got = node.op_type if node is not None else "a graph input"
            raise OptimizeError(f"expected {op_type} producing {name}, found {got}")
        return node

    def consumer(self, name: str, op_type: str) -> onnx.NodeProto:
        found = [n for n in self.consumers.get(name, []) if n.op_type == op_type]
        if len(found) != 1:
            raise OptimizeError(f"expected one {op_type} consuming {name}, found {len(found)}")
        return found[0]


def _perm(node: onnx.NodeProto) -> list[int]:
    return [list(a.ints) for a in node.attribute if a.name == "perm"][0]


def _head_input(g: _Graph, name: str, perm: list[int]) -> onnx.NodeProto:
    """Transpose(perm) <- Reshape <- Slice: returns the Slice (one of q, k, v)."""
    transpose = g.only(name, "Transpose")
    if _perm(transpose) != perm:
        raise OptimizeError(f"unexpected transpose {_perm(transpose)} at {transpose.name}")
    reshape = g.only(transpose.input[0], "Reshape")
    return g.only(reshape.input[0], "Slice")


def _fuse_one(g: _Graph, softmax: onnx.NodeProto, num_heads: int, index: int,
              mode: str) -> tuple[list[onnx.NodeProto], list]:
    """The nodes replacing the pattern around ``softmax`` (see ``fuse_attention``), and new
    initializers."""
    scale_node = g.producer.get(softmax.input[0])
    if scale_node is None or scale_node.op_type not in ("Mul", "Div"):
        raise OptimizeError(f"{softmax.name}: expected a scale Mul/Div before Softmax")
    scores_name, scale_const = None, None
    for inp in scale_node.input:
        value = g.constant(inp)
        if value is not None and value.size == 1:
            scale_const = float(value.reshape(()))
        else:
            scores_name = inp
    if scores_name is None or scale_const is None:
        raise OptimizeError(f"{scale_node.name}: the scale is not a scalar constant")
    scale = scale_const if scale_node.op_type == "Mul" else 1.0 / scale_const
    scores = g.only(scores_name, "MatMul")
    q_slice = _head_input(g, scores.input[0], [0, 2, 1, 3])
    k_slice = _head_input(g, scores.input[1], [0, 2, 3, 1])
    weighted = g.consumer(softmax.output[0], "MatMul")
    v_slice = _head_input(g, weighted.input[1], [0, 2, 1, 3])
    qkv = {s.input[0] for s in (q_slice, k_slice, v_slice)}
    if len(qkv) != 1:
        raise OptimizeError(f"{softmax.name}: q, k and v are not slices of one projection")
    start = g.constant(q_slice.input[1])
    if start is None or int(start.reshape(-1)[0]) != 0:
        raise OptimizeError(f"{softmax.name}: q is not the first third of the qkv projection")
    # The reference lays the projection out as [q | k | v] (timm layout); k and v follow q.
    qkv_out = qkv.pop()
    projection = g.producer[qkv_out]
    bias = None
    if projection.op_type == "Add":
        matmul_name, bias_name = projection.input[1], projection.input[0]
        if g.constant(bias_name) is None:
            matmul_name, bias_name = bias_name, matmul_name
        bias = g.constant(bias_name)
        projection = g.only(matmul_name, "MatMul")
    if projection.op_type != "MatMul":
        raise OptimizeError(f"{softmax.name}: qkv is produced by {projection.op_type}, not MatMul")
    weight = g.constant(projection.input[1])
    if weight is None or weight.ndim != 2 or weight.shape[1] != 3 * weight.shape[0]:
        raise OptimizeError(f"{softmax.name}: qkv weight is not a constant (D, 3D) matrix")
    dim = weight.shape[0]
    if bias is None:  # base/large have no qkv bias; the op's bias input is then zeros
        bias = np.zeros(3 * dim, np.float32)
    merged = g.only(g.consumer(weighted.output[0], "Transpose").output[0], "Transpose")  # (B, N, H, d)
    reshape = g.consumer(merged.output[0], "Reshape")
    prefix = f"fused_attention_{index}"
    if mode == "mha":
        return _mha_nodes(prefix, qkv_out, dim, num_heads, scale, reshape.output[0])
    new_inits = [numpy_helper.from_array(weight.astype(np.float32), f"{prefix}.qkv_weight"),
                 numpy_helper.from_array(bias.astype(np.float32), f"{prefix}.qkv_bias")]
    node = helper.make_node(
        "Attention", [projection.input[0], new_inits[0].name, new_inits[1].name], [reshape.output[0]],
        name=prefix, domain=CONTRIB_DOMAIN, num_heads=num_heads, scale=scale,
    )
    return [node], new_inits


def _mha_nodes(prefix: str, qkv: str, dim: int, num_heads: int, scale: float,
               output: str) -> tuple[list[onnx.NodeProto], list]:
    """Keep the qkv projection (one large GEMM), slice q, k, v with constant bounds and run
    only the attention core as ``com.microsoft.MultiHeadAttention``."""
    inits, nodes, parts = [], [], []
    axis = numpy_helper.from_array(np.array([-1], np.int64), f"{prefix}.axis")
    inits.append(axis)
    for i, part in enumerate("qkv"):
        starts = numpy_helper.from_array(np.array([i * dim], np.int64), f"{prefix}.{part}_start")
        ends = numpy_helper.from_array(np.array([(i + 1) * dim], np.int64), f"{prefix}.{part}_end")
        inits += [starts, ends]
        parts.append(f"{prefix}.{part}")
        nodes.append(helper.make_node("Slice", [qkv, starts.name, ends.name, axis.name], [parts[-1]],
                                      name=f"{prefix}.slice_{part}"))
    nodes.append(helper.make_node("MultiHeadAttention", parts, [output], name=prefix, domain=CONTRIB_DOMAIN,
                                  num_heads=num_heads, scale=scale))
    return nodes, inits


def _prune(model: onnx.ModelProto) -> None:
    """Drop nodes no graph output depends on, then initializers nothing reads."""
    g = model.graph
    producer = {out: n for n in g.node for out in n.output}
    needed: set[str] = set()
    stack = [o.name for o in g.output]
    live: set[int] = set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        node = producer.get(name)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(i for i in node.input if i)
    kept = [n for n in g.node if id(n) in live]
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input}
    inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)


FUSION_MODES = ("attention", "mha")


def fuse_attention(model: onnx.ModelProto, num_heads: int, mode: str = "attention") -> int:
    """Fuse every self-attention of ``model`` in place; returns how many were fused.

    mode "attention": qkv projection and attention in one ``Attention`` node;
    mode "mha": qkv projection kept as a MatMul, the core in ``MultiHeadAttention``.
    """
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    g = _Graph(model)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    if not softmaxes:
        raise OptimizeError("no Softmax in the graph: nothing to fuse")
    fused = []
    for i, softmax in enumerate(softmaxes):
        fused.append(_fuse_one(g, softmax, num_heads, i, mode))
    # Put each fused node where its Softmax was: its inputs are computed before it, and the
    # nodes reading its output come after it.
    position = {id(s): k for k, s in enumerate(softmaxes)}
    nodes: list[onnx.NodeProto] = []
    new_ids = {id(n) for group, _ in fused for n in group}
    for n in model.graph.node:
        nodes.append(n)
        if id(n) in position:
            nodes.extend(fused[position[id(n)]][0])
    replaced = {group[-1].output[0] for group, _ in fused}
    # The old Reshapes that produced the attention outputs are now dead duplicates: drop them.
    nodes = [n for n in nodes if id(n) in new_ids or not (set(n.output) & replaced)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for _, inits in fused:
        model.graph.initializer.extend(inits)
    if not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    _prune(model)
    return len(fused)


def compare_graphs(original: Path, optimized: Path, dim: int, tokens: int, batches: tuple[int, ...] = (1, 3),
                   seed: int = 0) -> dict[str, float]:
    """Max abs and relative (to max |original|) difference of every output, ORT vs ORT."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(optimized), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    max_abs, max_rel = 0.0, 0.0
    for batch in batches:
        x = rng.standard_normal((batch, tokens, dim), dtype=np.float32)
        for ya, yb in zip(a.run(None, {"tokens": x}), b.run(None, {"tokens": x})):
            diff = float(np.max(np.abs(ya - yb)))
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / float(np.max(np.abs(ya))))
    return {"max_abs": max_abs, "max_rel": max_rel, "batches": list(batches)}


def optimize_export(src: Path, out: Path, log: Callable[[str], None] = print, overwrite: bool = False,
                    mode: str = "attention") -> dict:
    """Copy the export ``src`` to ``out`` with the encoder graph fused; returns the new manifest."""
    manifest = load_manifest(src)
    if out.exists():
        if not overwrite:
            raise OptimizeError(f"{out} already exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    encoder = manifest.data["encoder"]["graph"]
    entry = manifest.graph(encoder)
    if entry.external_data:
        raise OptimizeError("graphs with external data are not supported by this pass yet")
    shutil.copytree(src, out)
    path = out / entry.file
    model = onnx.load(str(path))
    count = fuse_attention(model, int(manifest.model["num_heads"]), mode)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    tokens = int(manifest.model["tokens_per_modality"]) * len(manifest.modalities)
    check = compare_graphs(src / entry.file, path, int(manifest.model["dim"]), tokens)
    tolerance = float(entry.raw.get("max_rel_error", 1e-4))
    log(f"{encoder}: fused {count} attention blocks; vs the portable graph: max abs {check['max_abs']:.2e}, "
        f"max rel {check['max_rel']:.2e} (tolerance {tolerance:.0e})")
    if check["max_rel"] > tolerance:
        shutil.rmtree(out)
        raise OptimizeError(f"fused graph differs from the portable one by {check['max_rel']:.2e} (relative)")
    data = json.loads((out / MANIFEST_NAME).read_text())
    graph = data["graphs"][encoder]
    graph["sha256"] = sha256_file(path)
    op = "Attention" if mode == "attention" else "MultiHeadAttention"
    graph["optimized"] = {"pass": f"tm_export.optimize.fuse_attention(mode={mode})", "fused_attention": count,
                          "contrib_ops": [f"{CONTRIB_DOMAIN}.{op}"], "portable": False,
                          "from_sha256": entry.sha256, "check_vs_portable": check}
    (out / MANIFEST_NAME).write_text(json.dumps(data, indent=2) + "\n")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tm_export.optimize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="export directory written by tm-export")
    p.add_argument("--out", type=Path, required=True, help="new export directory (ONNX Runtime only)")
    p.add_argument("--mode", choices=FUSION_MODES, default="attention",
                   help="attention: projection + attention in one node; mha: only the attention core")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        optimize_export(args.src, args.out, log=lambda s: print(s, flush=True), overwrite=args.overwrite,
                        mode=args.mode)
    except OptimizeError as exc:
        print(f"tm_export.optimize: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
