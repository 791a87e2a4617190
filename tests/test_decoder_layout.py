"""The decoder is stored once: one shared decoder graph, per output only a query and a head graph,
and no weight tensor in two graph files."""
from __future__ import annotations

import hashlib
import json
from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from tm_runtime import TerraMindRuntime

from .conftest import random_inputs

D = 192  # tiny
N = 196


def tensors(path) -> dict[str, np.ndarray]:
    """Every initializer and Constant tensor of a graph file, by name."""
    model = onnx.load(str(path))
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.HasField("t"):
                out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def test_one_decoder_for_every_output(two_output_export):
    m = json.loads((two_output_export / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["decoder"] == {"graph": "decoder"}
    roles = defaultdict(list)
    for name, g in m["graphs"].items():
        roles[g.get("role")].append(name)
    assert roles["decoder"] == ["decoder"]
    assert sorted(roles["decoder_queries"]) == ["decoder_query_LULC", "decoder_query_S1GRD"]
    assert sorted(roles["decoder_head"]) == ["decoder_head_LULC", "decoder_head_S1GRD"]
    for target, vocab in (("S1GRD", 15360), ("LULC", 4375)):
        t = m["targets"][target]
        assert (t["query_graph"], t["head_graph"]) == (f"decoder_query_{target}", f"decoder_head_{target}")
        # an output adds a head of V x D floats and a query table of N x D, not a decoder
        head = (two_output_export / f"decoder_head_{target}.onnx").stat().st_size
        assert vocab * D * 4 <= head < 1.05 * vocab * D * 4
        assert (two_output_export / f"decoder_query_{target}.onnx").stat().st_size < 1.1 * N * D * 4


def test_no_weight_is_stored_twice(two_output_export):
    m = json.loads((two_output_export / "manifest.json").read_text())
    where = defaultdict(set)
    for name, g in m["graphs"].items():
        for array in tensors(two_output_export / g["file"]).values():
            if array.nbytes >= 64 << 10:  # (the tokenizers' small fixed sin-cos tables repeat below this)
                where[digest(array)].add(name)
    twice = {h: sorted(graphs) for h, graphs in where.items() if len(graphs) > 1}
    assert not twice, f"tensors stored in several graph files: {sorted(twice.values())}"
    # and every weight of the decoder transformer lives in the decoder graph alone
    decoder = {digest(a) for a in tensors(two_output_export / "decoder.onnx").values() if a.nbytes >= 4096}
    # tiny: 4 blocks x 7 matrices (qkv, proj, q, kv, proj, fc1, fc2) and the context projection
    assert len(decoder) == 4 * 7 + 1
    assert all(where[h] == {"decoder"} for h in decoder if h in where)


def test_logits_compose_query_decoder_head(two_output_export):
    rt = TerraMindRuntime(two_output_export)
    x = random_inputs(2, 0, ["S2L2A"])
    enc, emb = rt.encode_context(rt.prepare(x))
    run = rt.backend.run
    queries = run("decoder_query_LULC", {"positions": np.arange(N)}, ["queries"])[0]
    assert queries.shape == (1, N, D)
    hidden = run("decoder", {"encoder_output": enc, "context_emb": emb, "queries": np.repeat(queries, 2, axis=0),
                             "self_bias": np.zeros((N, N), np.float32)}, ["hidden"])[0]
    by_hand = run("decoder_head_LULC", {"hidden": hidden}, ["logits"])[0]
    np.testing.assert_array_equal(rt.decoder_logits("LULC", enc, emb), by_hand)
    assert by_hand.shape == (2, N, 4375)
    # a query table lookup: any subset of positions, in any order, gives those rows
    some = run("decoder_query_LULC", {"positions": np.array([5, 0, 195])}, ["queries"])[0]
    np.testing.assert_array_equal(some[0], queries[0, [5, 0, 195]])
