"""The PyTorch contenders of ``--compare-torch``: our reference and upstream terratorch eager.

Everything here imports torch (and tm_export / terratorch); ``cli`` imports this module only
when ``--compare-torch`` is given, so the ONNX Runtime benchmark stays torch-free.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tm_runtime.manifest import Manifest, sha256_file
from tm_runtime.modalities import get_modality

from .machine import cpu_has_bf16, matmul_rates

# The contender the accuracy figures are measured against: upstream in full fp32.
FP32_REFERENCE = "terratorch_eager"


@dataclass
class Contender:
    """A callable ``run(inputs) -> last-layer embedding (numpy)`` plus facts about it."""

    name: str
    run: Callable[[dict[str, np.ndarray]], np.ndarray]
    module: torch.nn.Module
    notes: dict[str, Any] = field(default_factory=dict)


def configure_torch(threads: int) -> dict[str, Any]:
    """Same thread count as ONNX Runtime, full fp32 matmuls.

    ``import terratorch`` sets ``torch.set_float32_matmul_precision("medium")`` (its clay_v15
    module does so on import), which lets CPU matmuls run in reduced precision; we undo it so
    every contender computes in fp32. Call again after anything that imports terratorch.
    """
    torch.set_num_threads(threads)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    return {"num_threads": torch.get_num_threads(), "matmul_precision_found": before,
            "matmul_precision_used": torch.get_float32_matmul_precision()}


def _bands(manifest: Manifest) -> dict[str, list[str]]:
    """Band subsets the export was made with (empty for full band sets)."""
    out = {}
    for name, entry in manifest.modalities.items():
        if tuple(entry.bands) != get_modality(name).bands:
            out[name] = list(entry.bands)
    return out


def build_reference(manifest: Manifest, ckpt: Path | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Our PyTorch reference with the export's weights: the manifest's seed for a random-init
    export, ``ckpt`` otherwise (checked against the sha256 the manifest recorded)."""
    from tm_export.export import ExportConfig, build_reference as _build

    weights = manifest.data["weights"]
    model_info = manifest.model
    notes: dict[str, Any] = {}
    if weights.get("random_init"):
        config = ExportConfig(size=model_info["size"], modalities=list(manifest.modalities), out=Path("."),
                              random_init=True, seed=int(weights["seed"]), bands=_bands(manifest),
                              image_size=manifest.image_size)
        notes["weights"] = f"random-init, seed {weights['seed']} (from the manifest)"
    else:
        if ckpt is None:
            raise ValueError("this export has checkpoint weights: --compare-torch needs --ckpt PATH "
                             f"(the export used {weights.get('file')})")
        digest = sha256_file(ckpt)
        if weights.get("sha256") and digest != weights["sha256"]:
            raise ValueError(f"--ckpt {ckpt} has sha256 {digest[:16]}…, the export was made from "
                             f"{weights['sha256'][:16]}…; the comparison would use other weights")
        config = ExportConfig(size=model_info["size"], modalities=list(manifest.modalities), out=Path("."),
                              ckpt=Path(ckpt), bands=_bands(manifest), image_size=manifest.image_size)
        notes["weights"] = f"checkpoint {ckpt}"
    model, _ = _build(config, log=lambda s: None)
    return model.eval(), notes


def build_terratorch(manifest: Manifest, state_dict: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, dict]:
    """Upstream TerraMindViT with our weights loaded (same key space); raises ImportError
    when terratorch is not installed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from terratorch.registry import BACKBONE_REGISTRY

        kwargs: dict[str, Any] = {"pretrained": False, "modalities": list(manifest.modalities)}
        bands = _bands(manifest)
        if bands:
            kwargs["bands"] = bands
        model = BACKBONE_REGISTRY.build(manifest.model["name"], **kwargs)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("tokenizer")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"terratorch model does not take our weights: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return model.eval(), {"registry_name": manifest.model["name"], "missing_tokenizer_keys": len(result.missing_keys)}


def _merge_mean_last(layers: list[torch.Tensor], num_modalities: int) -> torch.Tensor:
    last = layers[-1]
    batch, tokens, dim = last.shape
    return last.reshape(batch, num_modalities, tokens // num_modalities, dim).mean(dim=1)


def _with_precision(run: Callable[[dict[str, np.ndarray]], np.ndarray], precision: str,
                    autocast_bf16: bool = False) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """``run`` under a given float32 matmul precision (and optionally CPU autocast to bf16); the
    global setting is put back afterwards, so contenders can be interleaved."""

    def wrapped(inputs: dict[str, np.ndarray]) -> np.ndarray:
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(precision)
        try:
            if autocast_bf16:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return np.asarray(run(inputs), dtype=np.float32)
            return run(inputs)
        finally:
            torch.set_float32_matmul_precision(before)

    return wrapped


def make_contenders(manifest: Manifest, ckpt: Path | None, threads: int,
                    log: Callable[[str], None]) -> tuple[list[Contender], dict[str, Any]]:
    """The reference (always) and terratorch (when importable), on the same weights: in fp32
    ("highest"), as a user gets it after ``import terratorch`` (which sets "medium": bf16 matmuls
    where the CPU has them) and, where the CPU has bf16, under torch.autocast(bfloat16)."""
    import sys

    info: dict[str, Any] = {}
    fresh_import = "terratorch" not in sys.modules
    reference, notes = build_reference(manifest, ckpt)

    def run_reference(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            images = {name: torch.from_numpy(a) for name, a in inputs.items()}
            return _merge_mean_last(reference(images), len(images)).numpy()

    contenders = [Contender("torch_reference", run_reference, reference, notes)]
    try:
        upstream, tt_notes = build_terratorch(manifest, reference.state_dict())
    except ImportError as exc:
        log(f"terratorch not importable ({exc}); comparing against the reference only")
        info["terratorch"] = f"not importable: {exc}"
    else:

        def run_terratorch(inputs: dict[str, np.ndarray]) -> np.ndarray:
            with torch.inference_mode():
                return upstream({name: torch.from_numpy(a) for name, a in inputs.items()})[-1].float().numpy()

        # What `import terratorch` leaves behind (its clay_v15 module sets "medium"): observed when
        # this call imported it, else (imported earlier in this process) the documented "medium".
        as_imported = torch.get_float32_matmul_precision() if fresh_import else "medium"
        info["matmul_precision_after_import"] = as_imported
        info["matmul_precision_after_import_observed"] = fresh_import
        contenders.append(Contender("terratorch_as_imported", _with_precision(run_terratorch, as_imported), upstream,
                                    {**tt_notes, "matmul_precision": as_imported,
                                     "bf16_hardware": cpu_has_bf16()}))
        contenders.append(Contender(FP32_REFERENCE, _with_precision(run_terratorch, "highest"), upstream,
                                    {**tt_notes, "matmul_precision": "highest"}))
        if cpu_has_bf16():
            contenders.append(Contender("terratorch_autocast_bf16",
                                        _with_precision(run_terratorch, "highest", autocast_bf16=True), upstream,
                                        {**tt_notes, "autocast": "torch.autocast('cpu', dtype=torch.bfloat16)"}))
        else:
            info["terratorch_autocast_bf16"] = "skipped: this CPU has no AVX512_BF16 / AMX-BF16"
    # After terratorch's import: put fp32 matmul precision and the thread count back.
    info["torch_settings"] = configure_torch(threads)
    return contenders, info


def count_flops(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> int:
    """FLOPs of one forward counted by torch.utils.flop_counter.FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        module({name: torch.from_numpy(a) for name, a in inputs.items()})
    return int(counter.get_total_flops())


def torch_sgemm_gflops(threads: int, n: int = 2048, repeats: int = 7) -> dict[str, Any]:
    """Best-of float32 (n x n) matmul rate with torch at ``threads`` threads (fp32 precision)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    rates = matmul_rates(lambda: torch.matmul(a, b, out=out), n, repeats)
    return {"library": "torch", "n": n, "repeats": repeats, "threads": torch.get_num_threads(),
            "matmul_precision": torch.get_float32_matmul_precision(), **rates}
