"""tm_export.streaming: graphs traced, passed through onnxslim and saved without copying their
weights, and the result the same model a plain ``torch.onnx.export`` + ``onnx.save`` gives."""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tm_export import streaming


class Toy(nn.Module):
    """A Conv, a Linear on 3-D input (its transposed weight is made by constant folding), a norm
    and a reshape with a constant shape."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.proj = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.a = nn.Parameter(torch.randn(32, 32))
        for p in self.parameters():  # nothing left at the constructor's zeros/ones
            p.data.add_(0.01 * torch.randn_like(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).flatten(2).transpose(1, 2)  # (B, HW, 16)
        return (self.norm(self.proj(y)) @ self.a).reshape(x.shape[0], -1, 4, 8)


EXPORT = dict(input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}}, opset_version=17,
              do_constant_folding=True)


def sample(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))


def plain_export(module: nn.Module, path) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (sample(),), str(path), dynamo=False, **EXPORT)
    return onnx.load(str(path))


def run(path, x: torch.Tensor) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


@contextlib.contextmanager
def no_capture():
    """As if the exporter's internals had changed: ``trace`` must fall back to a plain export."""
    original = streaming._capture_initializers

    @contextlib.contextmanager
    def unavailable(into):
        yield False

    streaming._capture_initializers = unavailable
    try:
        yield
    finally:
        streaming._capture_initializers = original


@pytest.mark.parametrize("capture", [True, False])
def test_trace_and_save_give_the_plain_export(tmp_path, capture):
    module = Toy().eval()
    expected = plain_export(module, tmp_path / "plain.onnx")
    with contextlib.nullcontext() if capture else no_capture():
        graph = streaming.trace(module, (sample(),), tmp_path / "raw.onnx", **EXPORT)
    if capture:  # the weights are the module's own memory, not copies
        assert np.shares_memory(graph.weights["conv.weight"], module.conv.weight.detach().numpy())
    assert graph.model.ByteSize() < 20_000  # the graph alone: the weights are graph inputs
    assert streaming.save(graph, tmp_path / "saved.onnx", external_threshold=1 << 30) == []
    # Byte for byte the same model once parsed (only the order of fields in the file differs).
    assert onnx.load(str(tmp_path / "saved.onnx")).SerializeToString() == expected.SerializeToString()


def test_external_data(tmp_path):
    module = Toy().eval()
    graph = streaming.trace(module, (sample(),), tmp_path / "raw.onnx", **EXPORT)
    assert streaming.save(graph, tmp_path / "ext.onnx", external_threshold=0) == ["ext.onnx.data"]
    model = onnx.load(str(tmp_path / "ext.onnx"), load_external_data=False)
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < streaming.INLINE_TENSOR_BYTES for t in inline)
    offsets = [int(dict((e.key, e.value) for e in t.external_data)["offset"]) for t in external]
    assert all(o % streaming.EXTERNAL_ALIGNMENT == 0 for o in offsets)
    x = sample(3)
    with torch.no_grad():
        ref = module(x).numpy()
    np.testing.assert_allclose(run(tmp_path / "ext.onnx", x), ref, rtol=1e-5, atol=1e-5)


def test_equal_weights_are_stored_once(tmp_path):
    """What onnxslim did to initializers with the same values (the exporter only merges tensors
    it sees as the same parameter): weights are graph inputs during onnxslim, so this does it."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 64])
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    nodes = [onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]), onnx.helper.make_node("MatMul", ["h", "w2"], ["y"])]
    inits = [onnx.numpy_helper.from_array(w, "w1"), onnx.numpy_helper.from_array(w.copy(), "w2")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y], inits),
                                   opset_imports=[onnx.helper.make_opsetid("", 17)])
    graph = streaming.detach(model)
    assert set(graph.weights) == {"w1", "w2"}
    assert streaming.deduplicate(graph) == 1 and set(graph.weights) == {"w1"}
    assert [list(n.input) for n in graph.model.graph.node] == [["x", "w1"], ["h", "w1"]]
    streaming.save(graph, tmp_path / "d.onnx", external_threshold=1 << 30)
    saved = onnx.load(str(tmp_path / "d.onnx"))
    assert [t.name for t in saved.graph.initializer] == ["w1"] and [i.name for i in saved.graph.input] == ["x"]
    xv = np.ones((2, 64), np.float32)
    out = ort.InferenceSession(str(tmp_path / "d.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": xv})[0]
    np.testing.assert_allclose(out, xv @ w @ w, rtol=1e-5)


def test_attach_and_detach_round_trip(tmp_path):
    module = Toy().eval()
    graph = streaming.trace(module, (sample(),), tmp_path / "raw.onnx", **EXPORT)
    order, names = graph.order, set(graph.weights)
    model = streaming.attach(graph)
    assert not graph.weights and names <= {t.name for t in model.graph.initializer}
    assert not names & {i.name for i in model.graph.input}
    back = streaming.detach(model)
    assert set(back.weights) == names and names <= {i.name for i in back.model.graph.input}
    back.order = order
    streaming.save(back, tmp_path / "again.onnx", external_threshold=1 << 30)
    expected = plain_export(module, tmp_path / "plain.onnx")
    assert onnx.load(str(tmp_path / "again.onnx")).SerializeToString() == expected.SerializeToString()
