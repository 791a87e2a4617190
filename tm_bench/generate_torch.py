"""The PyTorch contenders of ``tm-bench generate --compare-torch`` (imports torch lazily via cli)."""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tm_runtime import TerraMindRuntime

from .machine import cpu_has_bf16
from .stats import summarize
from .torch_side import configure_torch, torch_sgemm_gflops


def _reference(rt: TerraMindRuntime, outputs: list[str]):
    from tm_export.export import ExportConfig, build_reference, build_tokenizers

    weights = rt.manifest.data["weights"]
    if not weights.get("random_init"):
        raise ValueError("generate --compare-torch supports random-init exports (it rebuilds the weights from "
                         "the manifest's seed)")
    sizes = {t.get("size", "official") for t in weights.get("tokenizers", {}).values()}
    cfg = ExportConfig(size=rt.manifest.model["size"], modalities=list(rt.manifest.modalities),
                       output_modalities=list(rt.manifest.targets), out=Path("."), random_init=True,
                       seed=int(weights["seed"]), image_size=rt.manifest.image_size,
                       tokenizer_size=sizes.pop() if len(sizes) == 1 else "official")
    model, _ = build_reference(cfg, log=lambda s: None)
    tokenizers, _ = build_tokenizers(cfg, list(model.targets), log=lambda s: None)
    return model.eval(), tokenizers, cfg.tokenizer_size


def _terratorch(rt: TerraMindRuntime, model, tokenizers, inputs: list[str], outputs: list[str], timesteps: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from terratorch.registry import FULL_MODEL_REGISTRY

        upstream = FULL_MODEL_REGISTRY.build(f"{rt.manifest.model['name']}_generate", pretrained=False,
                                             modalities=inputs, output_modalities=outputs, timesteps=timesteps,
                                             temps=0.0, standardize=True).eval()
    result = upstream.sampler.model.load_state_dict(model.state_dict(), strict=False)
    if result.missing_keys:
        raise RuntimeError(f"terratorch generate model lacks our weights for {result.missing_keys[:5]}")
    from tm_runtime.modalities import get_target

    for name, tok in tokenizers.items():
        upstream.tokenizer[get_target(name).key].load_state_dict(tok.state_dict(), strict=True)
    return upstream


def compare_generate(rt: TerraMindRuntime, inputs: dict[str, np.ndarray], outputs: list[str], config,
                     ort_generate: Callable[[], object], log: Callable[[str], None]) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    from tm_export.reference.generation import reference_generate

    threads = config.threads or torch.get_num_threads()
    model, tokenizers, tokenizer_size = _reference(rt, outputs)
    notes: dict[str, Any] = {"tokenizers": tokenizer_size}

    def ref_generate():
        with torch.inference_mode():
            return reference_generate(model, tokenizers, inputs, outputs, np.random.default_rng(config.seed),
                                      timesteps=config.timesteps, temperature=0.0)

    from .device import engine_label

    engine = engine_label(getattr(config, "backend", "ort-cpu"), getattr(config, "precision", None))
    runs: list[tuple[str, Callable[[], object]]] = [(engine, ort_generate), ("pytorch_reference", ref_generate)]
    upstream = None
    if tokenizer_size != "official":
        notes["terratorch"] = "skipped: shrunken tokenizers have no terratorch counterpart"
    else:
        try:
            upstream = _terratorch(rt, model, tokenizers, list(inputs), outputs, config.timesteps)
            torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}

            def tt_generate(precision: str = "highest", bf16: bool = False):
                before = torch.get_float32_matmul_precision()
                torch.set_float32_matmul_precision(precision)
                try:
                    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        return upstream(dict(torch_inputs), timesteps=config.timesteps)
                finally:
                    torch.set_float32_matmul_precision(before)

            # As a user gets it ("medium", what `import terratorch` sets), in fp32, and where the CPU
            # has bf16 under autocast; terratorch_eager (fp32) is counted for the FLOPs.
            runs.append(("terratorch_as_imported", lambda: tt_generate("medium")))
            if cpu_has_bf16():
                runs.append(("terratorch_autocast_bf16", lambda: tt_generate("highest", bf16=True)))
            else:
                notes["terratorch_autocast_bf16"] = "skipped: this CPU has no AVX512_BF16 / AMX-BF16"
            runs.append(("terratorch_eager", tt_generate))
        except ImportError:
            notes["terratorch"] = "not installed"
    notes["torch_settings"] = configure_torch(threads)
    counted = runs[-1]
    counter = FlopCounterMode(display=False)
    with counter:
        counted[1]()
    flops = int(counter.get_total_flops())
    log(f"FLOPs of one generate, counted by FlopCounterMode on {counted[0]}: {flops / 1e9:.0f} GFLOP")
    samples: dict[str, list[float]] = {name: [] for name, _ in runs}
    for _ in range(config.warmup):
        for _, fn in runs:
            fn()
    for i in range(config.iters):
        order = runs[i % len(runs):] + runs[:i % len(runs)]  # rotate who goes first
        for name, fn in order:
            time.sleep(0.05)  # let the previous contender's spinning threads go to sleep
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
            log(f"  iter {i + 1}/{config.iters} {name}: {samples[name][-1]:.2f} s")
    return {"contenders": {name: summarize(s) for name, s in samples.items()}, "flops": flops,
            "flops_counted_on": counted[0], "sgemm": [torch_sgemm_gflops(threads)], "notes": notes}
