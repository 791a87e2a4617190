"""embed latency with and without ONNX Runtime's lean_memory (no per-session arenas, no pre-packed
weights), interleaved in one process, batch 1, 2 threads (BENCHMARKS.md "Memory: large").

    python scripts/bench_lean_memory.py EXPORT_DIR [ITERATIONS]
"""
from __future__ import annotations

import sys
import time

import numpy as np

from tm_runtime import TerraMindRuntime


def main(export_dir: str, iterations: int = 6) -> None:
    runtimes = {"default": TerraMindRuntime(export_dir, threads=2),
                "lean": TerraMindRuntime(export_dir, threads=2, backend_options={"lean_memory": True})}
    rng = np.random.default_rng(0)
    modalities = runtimes["default"].manifest.modalities
    inputs = {m: rng.standard_normal((1, s.num_channels, 224, 224)).astype(np.float32)
              for m, s in modalities.items() if not s.tokenized}
    for rt in runtimes.values():
        rt.embed(inputs)  # warm-up: sessions created
    seconds: dict[str, list[float]] = {name: [] for name in runtimes}
    for i in range(iterations):
        for name in list(runtimes)[:: 1 if i % 2 == 0 else -1]:  # alternate the order
            start = time.perf_counter()
            runtimes[name].embed(inputs)
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        print(f"{name}: p50 {np.median(values):.3f} s, min {min(values):.3f} s")
    print(f"lean / default p50: {np.median(seconds['lean']) / np.median(seconds['default']):.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
