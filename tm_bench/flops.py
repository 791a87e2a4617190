"""Matmul FLOPs of one ``embed`` call, computed from the manifest (torch-free).

Counts 2 FLOPs per multiply-add of every matrix product, the convention of
``torch.utils.flop_counter``; element-wise work (norms, softmax, activations) is left out, since
the floor is a GEMM floor. ``torch_side.count_flops`` measures the same with FlopCounterMode
and the two are reported side by side.
"""
from __future__ import annotations

from typing import Any

PATCH = 16


def _mlp_hidden(dim: int, mlp: str) -> int:
    # SwiGLU (base, large) spends 2/3 of the 4*D width, since it has a third projection.
    return int(2 * 4 * dim / 3) if mlp == "swiglu" else 4 * dim


def embed_flops(model: dict[str, Any], channels: int, batch: int) -> int:
    """Patch embedding of one modality: (B*N, C*16*16) @ (C*16*16, D)."""
    tokens = int(model["tokens_per_modality"])
    return 2 * batch * tokens * channels * PATCH * PATCH * int(model["dim"])


def encoder_flops(model: dict[str, Any], num_modalities: int, batch: int) -> dict[str, int]:
    """Encoder FLOPs split into the linear layers and the attention products (QK^T and AV).

    Upstream runs attention through ``F.scaled_dot_product_attention``, whose CPU kernel
    FlopCounterMode does not count (torch 2.14), so its totals match ``linear`` only.
    """
    dim, depth = int(model["dim"]), int(model["encoder_depth"])
    rows = batch * num_modalities * int(model["tokens_per_modality"])
    hidden = _mlp_hidden(dim, model.get("mlp", "gelu"))
    mlp_mats = 3 if model.get("mlp") == "swiglu" else 2
    per_layer_linear = 2 * rows * dim * (3 * dim + dim) + 2 * rows * dim * hidden * mlp_mats
    seq = num_modalities * int(model["tokens_per_modality"])
    per_layer_attention = 2 * (2 * batch * seq * seq * dim)  # QK^T and AV over all heads
    return {"linear": depth * per_layer_linear, "attention": depth * per_layer_attention}


def model_flops(manifest_data: dict[str, Any], modalities: list[str], batch: int) -> dict[str, Any]:
    """Per graph and total FLOPs of ``embed`` on the given modalities at ``batch``."""
    model = manifest_data["model"]
    per_graph: dict[str, int] = {}
    for name in modalities:
        entry = manifest_data["modalities"][name]
        per_graph[entry["graph"]] = embed_flops(model, int(entry["channels"]), batch)
    enc = encoder_flops(model, len(modalities), batch)
    encoder_graph = manifest_data["encoder"]["graph"]
    embeds = sum(per_graph.values())
    return {
        "per_graph": {**per_graph, encoder_graph: enc["linear"] + enc["attention"]},
        "per_graph_without_attention": {**per_graph, encoder_graph: enc["linear"]},
        "total": embeds + enc["linear"] + enc["attention"],
        "total_without_attention": embeds + enc["linear"],
        "attention": enc["attention"],
    }
