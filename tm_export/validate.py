"""Numerical validation of an exported graph against the PyTorch reference."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from .graphs import GraphSpec
from .memory import step


@dataclass
class OutputError:
    name: str
    batch: int
    max_abs: float
    max_rel: float  # max |got - ref| / max |ref|: relative to the output's scale, stable near zeros
    psnr_db: float | None = None  # of float outputs, over the reference's value range
    mismatch: float | None = None  # quantised outputs: fraction of elements that differ at all
    argmax_agreement: float | None = None  # logits: fraction of positions with the same argmax

    def to_json(self) -> dict:
        out = {"output": self.name, "batch": self.batch, "max_abs": self.max_abs, "max_rel": self.max_rel}
        if self.psnr_db is not None:
            out["psnr_db"] = self.psnr_db
        if self.mismatch is not None:
            out["mismatch"] = self.mismatch
        if self.argmax_agreement is not None:
            out["argmax_agreement"] = self.argmax_agreement
        return out


def compare(name: str, batch: int, got: np.ndarray, ref: np.ndarray, quantised: bool = False,
            argmax_axis: int | None = None) -> OutputError:
    if got.shape != ref.shape:
        raise AssertionError(f"output {name}: shape {got.shape} from ONNX Runtime, {ref.shape} from PyTorch")
    if got.dtype != ref.dtype:
        raise AssertionError(f"output {name}: dtype {got.dtype} from ONNX Runtime, {ref.dtype} from PyTorch")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    if not np.isfinite(got).all():
        return OutputError(name, batch, float("inf"), float("inf"))
    if quantised:
        # A value on a rounding boundary may round either way in two correct implementations:
        # count the elements that differ rather than how far.
        return OutputError(name, batch, max_abs, max_rel, mismatch=float((diff > 0).mean()))
    psnr = None
    if np.issubdtype(ref.dtype, np.floating) and ref.size:
        mse = float((diff ** 2).mean())
        span = float(ref.max() - ref.min())
        psnr = float("inf") if mse == 0 else float(10 * np.log10(span ** 2 / mse)) if span > 0 else None
    agreement = None
    if argmax_axis is not None:  # class/token logits: how often the decision is the same
        agreement = float((got.argmax(argmax_axis) == ref.argmax(argmax_axis)).mean())
    return OutputError(name, batch, max_abs, max_rel, psnr_db=psnr, argmax_agreement=agreement)


def validate_graph(spec: GraphSpec, onnx_path: str, batches: tuple[int, ...] = (1, 3), seed: int = 0,
                   release: Callable[[], None] | None = None) -> list[OutputError]:
    """Run the graph on ONNX Runtime (CPU) and the reference on the same random inputs.

    The reference runs first, on every batch; then ``release`` (if given) may free its weights
    before the session loads the graph's, so that the two copies are never in memory together."""
    gen = torch.Generator().manual_seed(seed)
    runs = []
    for batch in batches:
        inputs = spec.sample(batch, gen)
        with torch.no_grad(), step(f"reference b{batch}"):
            ref = (spec.reference or spec.module)(*inputs)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        runs.append((batch, {decl.name: t.numpy() for decl, t in zip(spec.inputs, inputs)}, [r.numpy() for r in ref]))
        del inputs, ref
    if release is not None:
        release()
    with step("session"):
        session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    errors = []
    for batch, feeds, ref in runs:
        with step(f"ort b{batch}"):
            got = session.run([d.name for d in spec.outputs], feeds)
        errors += [compare(d.name, batch, g, r, quantised=d.name in spec.quantised_outputs,
                           argmax_axis=spec.extra.get("argmax_axis") if d.name == "logits" else None)
                   for d, g, r in zip(spec.outputs, got, ref)]
    return errors


def summarize(errors: list[OutputError], max_rel_error: float, max_mismatch: float) -> dict:
    """Worst errors over outputs and batches, and whether they are within tolerance."""
    continuous = [e for e in errors if e.mismatch is None] or errors
    worst = max(continuous, key=lambda e: e.max_rel)
    out = {"max_abs": max(e.max_abs for e in continuous), "max_rel": worst.max_rel, "worst_output": worst.name,
           "batches": sorted({e.batch for e in errors}), "per_output": [e.to_json() for e in errors]}
    psnrs = [e.psnr_db for e in continuous if e.psnr_db is not None]
    if psnrs:
        out["min_psnr_db"] = min(psnrs)
    agreements = [e.argmax_agreement for e in errors if e.argmax_agreement is not None]
    if agreements:
        out["argmax_agreement"] = min(agreements)
    mismatches = [e.mismatch for e in errors if e.mismatch is not None]
    if mismatches:
        out["max_mismatch"] = max(mismatches)
    out["passed"] = bool(worst.max_rel <= max_rel_error and all(m <= max_mismatch for m in mismatches)
                         and all(np.isfinite(e.max_abs) for e in errors))
    return out
