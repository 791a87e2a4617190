"""tm_export.dynamic_int8: the int8 graph onnxruntime's quantize_dynamic writes, node for node and
bit for bit, without its copies of the float graph; graphs it does not cover go to onnxruntime."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tm_export import dynamic_int8  # noqa: E402
from tm_export.quantize import gated_projections, output_projections, quantize_graph, weight_nodes  # noqa: E402


def chosen_nodes(path: Path) -> list[str]:
    """The nodes quantize_graph quantises (its exclusions included)."""
    model = onnx.load(str(path), load_external_data=False)
    kept = set(output_projections(model)) | set(gated_projections(model))
    return [n for n in weight_nodes(model) if n not in kept]


def random_feeds(session, tokens: int = 392) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session.get_inputs():
        shape = [(1 if d == "batch" else tokens) if isinstance(d, str) else d for d in i.shape]
        feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("graph", ["encoder", "decoder"])
def test_same_graph_and_bits_as_onnxruntime(small_generate_export, tmp_path, graph):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = small_generate_export / f"{graph}.onnx"
    nodes = chosen_nodes(src)
    assert nodes and dynamic_int8.supported(onnx.load(str(src)), nodes)
    ours, theirs = tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    info = quantize_graph(src, ours, "dynamic", None)
    assert info["written_by"] == "tm_export.dynamic_int8"
    quantize_dynamic(str(src), str(theirs), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                     nodes_to_quantize=nodes)
    a, b = onnx.load(str(ours)), onnx.load(str(theirs))
    inits_a = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    inits_b = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert set(inits_a) == set(inits_b)
    for name, value in inits_a.items():
        assert value.dtype == inits_b[name].dtype and np.array_equal(value, inits_b[name]), name
    assert node_set(a) == node_set(b)
    assert Counter(n.op_type for n in a.graph.node)["MatMulInteger"] == len(nodes)
    assert_same_outputs(ours, theirs, random_feeds(ort.InferenceSession(str(ours)), tokens=196))


def node_set(model) -> Counter:
    """Every node as (op, name, inputs, outputs, attributes): onnxruntime sorts its nodes anew."""
    return Counter((n.op_type, n.name, tuple(n.input), tuple(n.output),
                    tuple((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)) for n in model.graph.node)


def assert_same_outputs(ours: Path, theirs: Path, feeds: dict[str, np.ndarray]) -> None:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session_a = ort.InferenceSession(str(ours), options, providers=["CPUExecutionProvider"])
    session_b = ort.InferenceSession(str(theirs), options, providers=["CPUExecutionProvider"])
    for x, y in zip(session_a.run(None, feeds), session_b.run(None, feeds)):
        np.testing.assert_array_equal(x, y)


def test_convolutions_go_to_onnxruntime(small_generate_export, tmp_path):
    src = small_generate_export / "unet_DEM.onnx"
    assert not dynamic_int8.supported(onnx.load(str(src)), chosen_nodes(src))
    assert quantize_graph(src, tmp_path / "unet.onnx", "dynamic", None)["written_by"] == "onnxruntime.quantization"


def _matmul_graph(weights: list[np.ndarray], opset: int = 17, b_from_input: bool = False):
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for i, w in enumerate(weights):
        b = f"w{i}"
        inits.append(numpy_helper.from_array(w, b))
        nodes.append(helper.make_node("MatMul", [x, "b_in" if b_from_input and i == 0 else b], [f"y{i}"], name=f"mm{i}"))
        x = f"y{i}"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", weights[0].shape[0]])]
    if b_from_input:
        inputs.append(helper.make_tensor_value_info("b_in", TensorProto.FLOAT, list(weights[0].shape)))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _fan_graph():
    """What the exported graphs do not show: one graph input feeding three MatMuls (one
    DynamicQuantizeLinear for all), one weight read by two of them, MatMul outputs that are graph
    outputs, and a float MatMul left alone."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(4)
    w = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in
         (("wa", (16, 8)), ("wb", (16, 8)), ("wc", (8, 8)))}
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["ya"], name="a"),
             helper.make_node("MatMul", ["x", "wb"], ["yb"], name="b"),
             helper.make_node("MatMul", ["x", "wa"], ["ya2"], name="a2"),
             helper.make_node("Add", ["ya", "yb"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "wc"], ["yc"], name="c_float")]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [5, 8]) for n in ("ya2", "yc")]
    graph = helper.make_graph(nodes, "fan", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 16])], outputs,
                              [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fan_out_and_shared_weights_as_onnxruntime(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, ours, theirs = tmp_path / "fan.onnx", tmp_path / "ours.onnx", tmp_path / "theirs.onnx"
    onnx.save(_fan_graph(), str(src))
    nodes = ["a", "b", "a2"]
    assert dynamic_int8.supported(onnx.load(str(src)), nodes)
    dynamic_int8.quantize_matmuls(src, ours, nodes)
    quantize_dynamic(str(src), str(theirs), weight_type=QuantType.QInt8, nodes_to_quantize=nodes)
    a, b = onnx.load(str(ours)), onnx.load(str(theirs))
    onnx.checker.check_model(a)
    assert node_set(a) == node_set(b)
    assert Counter(n.op_type for n in a.graph.node)["DynamicQuantizeLinear"] == 1
    assert {i.name for i in a.graph.initializer} == {i.name for i in b.graph.initializer}
    assert_same_outputs(ours, theirs, {"x": np.random.default_rng(5).standard_normal((5, 16)).astype(np.float32)})


def test_supported_only_where_the_result_is_onnxruntimes():
    from onnx import TensorProto, helper

    w = [np.ones((8, 8), np.float32)] * 2
    assert dynamic_int8.supported(_matmul_graph(w), ["mm0", "mm1"])
    assert not dynamic_int8.supported(_matmul_graph(w), [])
    assert not dynamic_int8.supported(_matmul_graph(w), ["mm0", "missing"])
    assert not dynamic_int8.supported(_matmul_graph(w, opset=10), ["mm0"])  # no DynamicQuantizeLinear
    assert not dynamic_int8.supported(_matmul_graph(w, b_from_input=True), ["mm0"])  # weight computed at run time
    assert not dynamic_int8.supported(_matmul_graph([np.ones((2, 8, 8), np.float32)]), ["mm0"])
    fan = _fan_graph()
    assert not dynamic_int8.supported(fan, ["a", "b"])  # wa is also read by a2, which stays float
    assert dynamic_int8.supported(fan, ["c_float"])
    unnamed = _matmul_graph(w)
    unnamed.graph.node[0].name = ""
    assert not dynamic_int8.supported(unnamed, [""])
    twice = _matmul_graph(w)
    twice.graph.node[1].name = "mm0"
    assert not dynamic_int8.supported(twice, ["mm0"])
    as_input = _matmul_graph(w)  # an initializer listed among the graph inputs (old IR): a feed may replace it
    as_input.graph.input.append(helper.make_tensor_value_info("w0", TensorProto.FLOAT, [8, 8]))
    assert not dynamic_int8.supported(as_input, ["mm0"])
    as_output = _matmul_graph(w)
    as_output.graph.output.append(helper.make_tensor_value_info("w1", TensorProto.FLOAT, [8, 8]))
    assert not dynamic_int8.supported(as_output, ["mm1"])
    taken = _matmul_graph(w)  # a tensor already has a name the rewrite would give
    taken.graph.node.append(helper.make_node("Identity", ["y1"], ["x_scale"], name="id"))
    assert not dynamic_int8.supported(taken, ["mm0"])


MEASURE = """
import json, resource, sys
from pathlib import Path
import onnx, onnxruntime.quantization
from tm_export import dynamic_int8
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
dynamic_int8.quantize_matmuls(Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3]))
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.big_memory
def test_the_float_graph_is_held_about_once(tmp_path):
    """A 134 MB graph of MatMuls: quantising it adds under 2.5x its size to the process. Measured:
    this module 2.0x (reading the file: its bytes and the parsed proto), onnxruntime's
    quantize_dynamic 3.4x; on the base encoder (340 MB) 1.6x and 4.1x."""
    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((2048, 2048)).astype(np.float32) for _ in range(8)]
    src = tmp_path / "big.onnx"
    onnx.save(_matmul_graph(weights), str(src))
    del weights
    added = int(subprocess.run([sys.executable, "-c", MEASURE, str(src), str(tmp_path / "out.onnx"),
                                json.dumps([f"mm{i}" for i in range(8)])],
                               check=True, capture_output=True, text=True).stdout.strip())
    assert added < 2.5 * src.stat().st_size, f"{added / 1e6:.0f} MB added for a {src.stat().st_size / 1e6:.0f} MB graph"
