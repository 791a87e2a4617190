"""Every embed path of one model interleaved in one process: ONNX Runtime fp32 and int8, OpenVINO
fp32 / bf16 (where the CPU has bf16) / on the int8 graphs, and terratorch as imported ("medium"),
in fp32 ("highest") and under autocast bf16 (where the CPU has bf16). Same random-weight inputs
(standard normal = already standardised), same thread count; p50/min per path, speed-up over
terratorch as imported, and the token cosine of each path against terratorch fp32.

    python scripts/bench_paths.py --fp32 /tmp/bench_tiny --int8 /tmp/bench_tiny_int8 --batch 1 --iters 20

The int8 export must come from the same seed (tm-export ... --seed 0 --precision int8).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from tm_bench import machine
from tm_runtime import TerraMindRuntime
from tm_runtime.accuracy import token_cosines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp32", type=Path, required=True)
    p.add_argument("--int8", type=Path, default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--gap-ms", type=float, default=50.0)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    threads = args.threads
    has_bf16 = machine.cpu_has_bf16()
    paths = {"ort-fp32": TerraMindRuntime(args.fp32, threads=threads)}
    if args.int8:
        paths["ort-int8"] = TerraMindRuntime(args.int8, threads=threads)
    ov = {"threads": threads, "cache_dir": None}
    try:
        paths["openvino-fp32"] = TerraMindRuntime(args.fp32, backend="openvino", backend_options=ov)
        if has_bf16:
            paths["openvino-bf16"] = TerraMindRuntime(args.fp32, backend="openvino",
                                                      backend_options={**ov, "precision": "bf16"})
            # the same without embed's fused chain: what joining the graphs into one model is worth
            paths["openvino-bf16-graph-by-graph"] = TerraMindRuntime(
                args.fp32, backend="openvino", backend_options={**ov, "precision": "bf16", "fuse_embed": False})
        if args.int8:
            paths["openvino-on-int8-graphs"] = TerraMindRuntime(args.int8, backend="openvino", backend_options=ov)
    except Exception as exc:  # openvino missing: the ORT paths still run
        print(f"openvino: {exc}", file=sys.stderr)
    rt = paths["ort-fp32"]
    rng = np.random.default_rng(0)
    size = rt.manifest.image_size
    inputs = {n: rng.standard_normal((args.batch, m.num_channels, size, size), dtype=np.float32)
              for n, m in rt.manifest.modalities.items()}
    runs = {name: (lambda r=r: r.embed(inputs)) for name, r in paths.items()}
    outputs = {name: fn() for name, fn in runs.items()}
    info: dict = {}
    if not args.no_torch:
        from tm_bench import torch_side

        torch_side.configure_torch(threads)
        contenders, info = torch_side.make_contenders(rt.manifest, None, threads, lambda s: None)
        for c in contenders:
            if c.name.startswith("terratorch"):
                runs[c.name] = lambda c=c: c.run(inputs)
                outputs[c.name] = c.run(inputs)
    reference = outputs.get("terratorch_eager", outputs["ort-fp32"])
    names = list(runs)
    for _ in range(args.warmup):
        for n in names:
            runs[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(args.iters):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            time.sleep(args.gap_ms / 1e3)
            start = time.perf_counter()
            runs[n]()
            samples[n].append(time.perf_counter() - start)
    base = "terratorch_as_imported" if "terratorch_as_imported" in samples else "ort-fp32"
    rows = []
    for n in names:
        cos = token_cosines(outputs[n], reference)
        paired = float(np.median([b / s for b, s in zip(samples[base], samples[n])]))
        rows.append({"path": n, "p50_ms": 1e3 * float(np.median(samples[n])), "min_ms": 1e3 * min(samples[n]),
                     "speedup_vs_" + base: float(np.median(samples[base]) / np.median(samples[n])),
                     "paired_speedup": paired, "token_cosine_min": float(cos.min()),
                     "token_cosine_mean": float(cos.mean())})
    flags = machine.cpu_flags()
    print(f"{machine.cpu_model()}, threads {threads}, batch {args.batch}, {args.iters} interleaved iterations, "
          f"load {os.getloadavg()}")
    print("flags: " + " ".join(f if on else f"-{f}" for f, on in flags.items()))
    print(f"| path | p50 ms | min ms | speed-up vs {base} (median / paired) | token cosine vs terratorch fp32 min / mean |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['p50_ms']:.1f} | {r['min_ms']:.1f} | {r['speedup_vs_' + base]:.2f}x / "
              f"{r['paired_speedup']:.2f}x | {r['token_cosine_min']:.6f} / {r['token_cosine_mean']:.6f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "samples": samples, "flags": flags, "torch": info,
                                         "machine": machine.machine_info(), "versions": machine.versions(True)},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
