"""Graphs without their weights in memory twice: trace, transform and save ONNX graphs while the
weights stay where they already are (the torch modules' tensors).

``torch.onnx.export`` builds the whole model in protobuf, serialises it, copies it into Python
bytes and parses it once more (3-4 copies of the weights), and ``onnx.load`` + onnxslim + ``onnx.save``
add several more. Here instead:

- ``trace`` exports the graph with ``export_params=False`` (the weights become graph inputs named
  like the initializers they would have been) and keeps the exporter's own name -> tensor table,
  taken from its initializer de-duplication pass: views of the module's tensors plus the few
  tensors constant folding made, no copy;
- graph passes (onnxslim, dims) run on that small ``WeightlessModel``, where a weight, being an
  input, is never folded or rewritten;
- ``save`` writes the protobuf by hand around the tensors' bytes (inline, or an external data file
  above a size threshold): fields in another order than ``SerializeToString`` but the same
  message, read by every ONNX parser.

Where the exporter's internals are not as expected, ``trace`` falls back to a plain export and
moves the initializers out of the loaded model (one copy, as before).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

# Tensors below this many bytes stay inside the graph file even when the others go to external
# data (what onnx.save_model does with its size_threshold default).
INLINE_TENSOR_BYTES = 1024
# External tensors start at multiples of this (page size): memory-mappable in place.
EXTERNAL_ALIGNMENT = 4096

_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


@dataclass
class WeightlessModel:
    """An ONNX model whose weights are graph inputs; their values are in ``weights`` (C-contiguous
    numpy arrays, usually views of torch tensors), in the order the exporter listed them."""

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]
    # The initializers' order in the saved file (by name; weights and the graph's own
    # initializers interleaved): the exporter's, then the order of first use after onnxslim, as a
    # plain export + onnxslim would have written them. Names not in it go last.
    order: list[str] = field(default_factory=list)

    def order_by_first_use(self) -> None:
        names = set(self.weights) | {t.name for t in self.model.graph.initializer}
        order: dict[str, None] = {}
        for node in _all_nodes(self.model.graph):
            order.update((i, None) for i in node.input if i in names)
        self.order = list(order)

    @property
    def nbytes(self) -> int:
        own = sum(_tensor_bytes(t) for t in self.model.graph.initializer)
        return sum(a.nbytes for a in self.weights.values()) + own


def _tensor_bytes(t: TensorProto) -> int:
    return len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; the graphs are fp32 anyway
        raise TypeError("bfloat16 weights cannot be saved as ONNX raw data here")
    return np.ascontiguousarray(tensor.cpu().numpy())


@contextmanager
def _capture_initializers(into: dict[str, torch.Tensor]) -> Iterator[bool]:
    """Keep the (name -> tensor) table the TorchScript exporter turns into initializers; yields
    whether the hook could be installed (the exporter's internals are private and may change)."""
    c = torch._C
    original = getattr(c, "_jit_pass_onnx_deduplicate_initializers", None)
    if original is None:
        yield False
        return

    def capture(graph, params, training):
        out = original(graph, params, training)
        into.update(out)
        return out

    c._jit_pass_onnx_deduplicate_initializers = capture
    try:
        yield True
    finally:
        c._jit_pass_onnx_deduplicate_initializers = original


def trace(module: torch.nn.Module, args: tuple, path: Path, **export_kwargs) -> WeightlessModel:
    """``torch.onnx.export(module, args, path, **export_kwargs)`` (TorchScript exporter) without
    copying the weights: the graph is written to ``path`` (it may be removed afterwards) and the
    weights come back as arrays sharing memory with the module's tensors."""
    captured: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with _capture_initializers(captured) as hooked:
            if hooked:
                torch.onnx.export(module, args, str(path), export_params=False, dynamo=False, **export_kwargs)
        if hooked and captured:
            model = onnx.load(str(path))
            inputs = {v.name for v in model.graph.input}
            if set(captured) <= inputs:
                # The exporter's initializer order is that of the graph's inputs (``captured`` is sorted by name).
                order = [v.name for v in model.graph.input if v.name in captured]
                graph = WeightlessModel(model, {name: _to_numpy(captured[name]) for name in order}, order)
                captured.clear()
                _inline_small(graph)
                return graph
        # The capture did not work: a plain export, then the initializers moved out (one copy).
        captured.clear()
        torch.onnx.export(module, args, str(path), export_params=True, dynamo=False, **export_kwargs)
    model = onnx.load(str(path))
    return detach(WeightlessModel(model, {}, [t.name for t in model.graph.initializer]))


def _inline_small(graph: WeightlessModel) -> None:
    """Tensors under ``INLINE_TENSOR_BYTES`` (shapes, scalars) back into the graph as initializers:
    graph passes may fold them, as they would have in a plain export."""
    small = [name for name, array in graph.weights.items() if array.nbytes < INLINE_TENSOR_BYTES]
    _remove_inputs(graph.model, set(small))
    graph.model.graph.initializer.extend(numpy_helper.from_array(graph.weights.pop(n), n) for n in small)


def detach(model: onnx.ModelProto | WeightlessModel, min_bytes: int = INLINE_TENSOR_BYTES) -> WeightlessModel:
    """Move every initializer of at least ``min_bytes`` out of the protobuf into numpy arrays
    (graph inputs of the same name, type and shape take their place), one tensor at a time; a
    ``WeightlessModel`` gets them added after its own weights."""
    graph = model if isinstance(model, WeightlessModel) else WeightlessModel(model, {})
    initializers = graph.model.graph.initializer
    keep, moved = [], {}
    while initializers:
        tensor = initializers.pop()
        if _tensor_bytes(tensor) < min_bytes:
            keep.append(tensor)
        else:
            moved[tensor.name] = numpy_helper.to_array(tensor)
        del tensor
    initializers.extend(reversed(keep))
    for name, array in reversed(list(moved.items())):
        graph.weights[name] = array
        graph.model.graph.input.append(_value_info(name, array))
    return graph


def _value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)


def attach(graph: WeightlessModel) -> onnx.ModelProto:
    """The model with its weights as ordinary initializers (one copy of the weights, in protobuf),
    for transforms that need them there (fp16 conversion); ``graph`` is emptied."""
    model = graph.model
    names = set(graph.weights)
    _remove_inputs(model, names)
    while graph.weights:
        name = next(iter(graph.weights))
        model.graph.initializer.append(numpy_helper.from_array(graph.weights.pop(name), name))
    return model


def _remove_inputs(model: onnx.ModelProto, names: set[str]) -> None:
    kept = [v for v in model.graph.input if v.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def deduplicate(graph: WeightlessModel) -> int:
    """Let identical weights (same dtype, shape and bytes) be stored once, as onnxslim would have
    done had it seen the values; returns how many were dropped."""
    seen: dict[tuple, str] = {}
    alias: dict[str, str] = {}
    for name, array in graph.weights.items():
        digest = hashlib.blake2b(memoryview(array).cast("B"), digest_size=16).digest()
        key = (array.dtype.str, array.shape, digest)
        if key in seen and np.array_equal(graph.weights[seen[key]], array):
            alias[name] = seen[key]
        else:
            seen[key] = name
    if not alias:
        return 0
    for node in _all_nodes(graph.model.graph):
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    _remove_inputs(graph.model, set(alias))
    for name in alias:
        del graph.weights[name]
    return len(alias)


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


def prune(graph: WeightlessModel) -> None:
    """Drop weights no node reads any more (a graph pass removed their consumers)."""
    used = {name for node in _all_nodes(graph.model.graph) for name in node.input}
    unused = {name for name in graph.weights if name not in used}
    _remove_inputs(graph.model, unused)
    for name in unused:
        del graph.weights[name]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field: int, length: int) -> bytes:
    """Tag and length of a length-delimited field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(length)


def _header(name: str, array: np.ndarray) -> TensorProto:
    tensor = TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    tensor.dims.extend(array.shape)
    return tensor


def save(graph: WeightlessModel, path: Path, external_threshold: int) -> list[str]:
    """Write ``graph`` with its weights as initializers to ``path``, streaming them from where they
    are; when they total more than ``external_threshold`` bytes, tensors of at least
    ``INLINE_TENSOR_BYTES`` go to ``<file>.data`` beside it. Returns the external file names.
    ``graph`` is used up (its weights are released as they are written)."""
    path = Path(path)
    detach(graph)  # the graph's own big initializers (constants a pass made) are streamed too
    model, weights, total = graph.model, graph.weights, graph.nbytes
    _remove_inputs(model, set(weights))
    rank = {name: i for i, name in enumerate(graph.order)}
    own = list(model.graph.initializer)
    model.graph.ClearField("initializer")
    names = sorted([t.name for t in own] + list(weights), key=lambda n: rank.get(n, len(rank)))
    tensors = {t.name: t for t in own}
    entries = [tensors.get(name, name) for name in names]  # a TensorProto, or the name of a weight
    if total > external_threshold:
        return [_save_external(model, entries, weights, path)]
    _save_inline(model, entries, weights, path)
    return []


def _save_inline(model: onnx.ModelProto, entries: list, weights: dict[str, np.ndarray], path: Path) -> None:
    # A message is the concatenation of its fields, in any order: the model without its graph,
    # then the graph field, whose payload is the graph without initializers followed by one
    # initializer field per tensor (for a weight: its header fields, then raw_data from memory).
    graph_bytes = model.graph.SerializeToString()
    chunks = []
    for entry in entries:
        if isinstance(entry, TensorProto):
            data = entry.SerializeToString()
            chunks.append((_length_delimited(_INITIALIZER_FIELD, len(data)) + data, None))
            continue
        array = weights[entry]
        head = _header(entry, array).SerializeToString() + _length_delimited(_RAW_DATA_FIELD, array.nbytes)
        chunks.append((_length_delimited(_INITIALIZER_FIELD, len(head) + array.nbytes) + head, entry))
    graph_length = len(graph_bytes) + sum(len(c) + (weights[n].nbytes if n else 0) for c, n in chunks)
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    with open(path, "wb") as f:
        f.write(rest.SerializeToString())
        f.write(_length_delimited(_GRAPH_FIELD, graph_length))
        f.write(graph_bytes)
        for prefix, name in chunks:
            f.write(prefix)
            if name:
                f.write(memoryview(weights.pop(name)).cast("B"))


def _save_external(model: onnx.ModelProto, entries: list, weights: dict[str, np.ndarray], path: Path) -> str:
    data_name = path.name + ".data"
    with open(path.parent / data_name, "wb") as f:
        for entry in entries:
            if isinstance(entry, TensorProto):
                model.graph.initializer.append(entry)
                continue
            array = weights.pop(entry)
            tensor = _header(entry, array)
            if array.nbytes < INLINE_TENSOR_BYTES:
                tensor.raw_data = array.tobytes()
            else:
                f.write(b"\0" * (-f.tell() % EXTERNAL_ALIGNMENT))
                offset = f.tell()
                f.write(memoryview(array).cast("B"))
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(array.nbytes))):
                    item = tensor.external_data.add()
                    item.key, item.value = key, value
            model.graph.initializer.append(tensor)
            del array
    os.chmod(path.parent / data_name, 0o644)  # the graph file's mode (not owner-only)
    onnx.save_model(model, str(path))
    return data_name
