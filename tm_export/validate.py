"""Numerical validation of an exported graph against the PyTorch reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from .graphs import GraphSpec


@dataclass
class OutputError:
    name: str
    batch: int
    max_abs: float
    max_rel: float  # max |got - ref| / max |ref|: relative to the output's scale, stable near zeros

    def to_json(self) -> dict:
        return {"output": self.name, "batch": self.batch, "max_abs": self.max_abs, "max_rel": self.max_rel}


def compare(name: str, batch: int, got: np.ndarray, ref: np.ndarray) -> OutputError:
    if got.shape != ref.shape:
        raise AssertionError(f"output {name}: shape {got.shape} from ONNX Runtime, {ref.shape} from PyTorch")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    if not np.isfinite(got).all():
        max_abs = max_rel = float("inf")
    return OutputError(name, batch, max_abs, max_rel)


def validate_graph(spec: GraphSpec, onnx_path: str, batches: tuple[int, ...] = (1, 3), seed: int = 0) -> list[OutputError]:
    """Run the graph on ONNX Runtime (CPU) and the reference on the same random inputs."""
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    errors = []
    for batch in batches:
        inputs = spec.sample(batch, gen)
        with torch.no_grad():
            ref = spec.module(*inputs)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        feeds = {decl.name: t.numpy() for decl, t in zip(spec.inputs, inputs)}
        got = session.run([d.name for d in spec.outputs], feeds)
        errors += [compare(d.name, batch, g, r.numpy()) for d, g, r in zip(spec.outputs, got, ref)]
    return errors


def summarize(errors: list[OutputError]) -> dict:
    worst = max(errors, key=lambda e: e.max_rel)
    return {"max_abs": max(e.max_abs for e in errors), "max_rel": worst.max_rel, "worst_output": worst.name,
            "batches": sorted({e.batch for e in errors}), "per_output": [e.to_json() for e in errors]}
