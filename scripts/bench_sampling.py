"""One token draw at generate's defaults (temperature 1, top_p 0.8, top_k 0): ours (numpy) against
terratorch's GenerationSampler.sample_tokens (torch), interleaved in one process, 2 threads
(BENCHMARKS.md "Token sampling at the defaults").

    python scripts/bench_sampling.py [--iterations 7]

The shapes are generate's: 196 tokens of one image for S1GRD-like (V = 15360) and LULC (V = 4375)
heads, and 392 rows (batch 2). Logits are random normal x 3: a wide nucleus, the sort's worst case.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from terratorch.models.backbones.terramind.model import generate as tt_generate

from tm_runtime.sampling import sample_tokens

SHAPES = [(196, 15360), (196, 4375), (392, 15360)]


class _UpstreamSampler:
    """Just enough of GenerationSampler for its two sampling methods, which use no model state."""

    top_k_top_p_filtering = tt_generate.GenerationSampler.top_k_top_p_filtering
    sample_tokens = tt_generate.GenerationSampler.sample_tokens


def main(iterations: int = 7) -> None:
    torch.set_num_threads(2)
    upstream = _UpstreamSampler()
    rng = np.random.default_rng(0)
    for rows, vocab in SHAPES:
        logits = (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
        logits_torch = torch.from_numpy(logits)
        contenders = {
            "tm_runtime.sampling": lambda: sample_tokens(logits, np.random.default_rng(1), 1.0, 0, 0.8),
            # upstream filters in place: hand it a copy, as its caller's logits are a fresh tensor too
            "terratorch": lambda: upstream.sample_tokens(logits_torch.clone(), 1.0, 0.0, 0.8),
        }
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        for i in range(iterations):
            for name in list(contenders)[:: 1 if i % 2 == 0 else -1]:  # alternate the order
                start = time.perf_counter()
                contenders[name]()
                seconds[name].append(time.perf_counter() - start)
        medians = {name: 1000 * float(np.median(s)) for name, s in seconds.items()}
        print(f"{rows} x {vocab}: " + ", ".join(f"{n} {m:.0f} ms" for n, m in medians.items())
              + f"  (terratorch / ours {medians['terratorch'] / medians['tm_runtime.sampling']:.2f}x)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=7, help="timed calls per contender and shape (default 7)")
    main(parser.parse_args().iterations)
