"""The main job: export TerraMind tiny (random weights, offline), embed real TerraMesh tiles
through ONNX Runtime, print the validation and a latency table."""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TILES = ROOT.parent / "shared" / "data" / "terramesh_examples"  # a shared/ folder beside the checkout
INPUTS = ["S2L2A", "S1RTC", "DEM"]  # modalities with real TerraMesh tiles
OUTPUTS = ["S1GRD", "LULC"]


def load_tiles(tiles: Path, modality: str, count: int) -> np.ndarray | None:
    import tifffile

    files = sorted((tiles / modality).glob("*.tif"))[:count]
    if len(files) < count:
        return None
    arrays = [tifffile.imread(f).astype(np.float32) for f in files]
    return np.stack([a[None] if a.ndim == 2 else np.moveaxis(a, -1, 0) for a in arrays])


def warn_random_inputs(why: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! NOT REAL DATA: {why}.\n!! The quickstart falls back to RANDOM inputs at the pretraining "
          f"statistics:\n!! the numbers below show speed and plumbing only. Put 224x224 TerraMesh GeoTIFFs in\n"
          f"!!   <dir>/{{{','.join(INPUTS)}}}/*.tif  (default <dir>: {TILES})\n!! or pass --tiles DIR.\n{bar}\n",
          file=sys.stderr, flush=True)


def make_inputs(runtime, batch: int, tiles_dir: Path) -> tuple[dict[str, np.ndarray], str]:
    try:
        import tifffile  # noqa: F401
    except ImportError:
        warn_random_inputs("tifffile is not installed (pip install tifffile), so the tiles cannot be read")
    else:
        tiles = {m: load_tiles(tiles_dir, m, batch) for m in INPUTS}
        if all(t is not None for t in tiles.values()):
            return tiles, f"{batch} real TerraMesh tiles per modality from {tiles_dir}"
        missing = [m for m, t in tiles.items() if t is None]
        warn_random_inputs(f"fewer than {batch} TerraMesh tiles for {', '.join(missing)} under {tiles_dir}")
    rng = np.random.default_rng(0)
    fake = {}
    for m in INPUTS:
        spec = runtime.manifest.modalities[m]
        mean = np.asarray(spec.mean, np.float32)[None, :, None, None]
        std = np.asarray(spec.std, np.float32)[None, :, None, None]
        fake[m] = (rng.standard_normal((batch, spec.num_channels, 224, 224)).astype(np.float32) * std + mean)
    return fake, "RANDOM inputs at the pretraining statistics (TerraMesh tiles not found: see the warning above)"


def print_validation(manifest: dict) -> None:
    print("\nvalidation (ONNX Runtime CPU vs PyTorch reference, batches 1 and 3):")
    print(f"  {'graph':<22} {'max abs':>10} {'max rel':>10} {'tolerance':>10}  result")
    for name, g in manifest["graphs"].items():
        v = g.get("validation")
        if v:
            print(f"  {name:<22} {v['max_abs']:>10.2e} {v['max_rel']:>10.2e} {g['max_rel_error']:>10.0e}  "
                  f"{'OK' if v['passed'] else 'FAILED'}")


def time_calls(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "tm-quickstart" / "tiny")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--timesteps", type=int, default=10, help="diffusion steps for generate")
    parser.add_argument("--tiles", type=Path, default=TILES,
                        help="TerraMesh tiles, one folder per modality holding *.tif (default: %(default)s)")
    parser.add_argument("--fast", action="store_true",
                        help="shrunken random tokenizers (seconds instead of minutes; latency not representative)")
    args = parser.parse_args()

    cmd = ["tm-export", "--model", "tiny", "--modalities", *INPUTS, "--output-modalities", *OUTPUTS,
           "--random-init", "--seed", "0", "--out", str(args.out), "--overwrite"]
    if args.fast:
        cmd.append("--small-tokenizers")
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)

    from tm_bench.stats import summarize
    from tm_runtime import TerraMindRuntime

    runtime = TerraMindRuntime(args.out)
    print_validation(runtime.manifest.data)
    inputs, what = make_inputs(runtime, batch=2, tiles_dir=args.tiles)
    print(f"\ninputs: {what}")
    embedding = runtime.embed(inputs, standardize=True)
    print(f"embed(merge_method='mean') -> {embedding.shape} {embedding.dtype}")
    per_modality = runtime.embed(inputs, merge_method="dict", standardize=True)
    print("embed(merge_method='dict') -> " + ", ".join(f"{k}: {v.shape}" for k, v in per_modality.items()))
    logits = runtime.logits(inputs, "LULC", standardize=True)
    print(f"logits(..., 'LULC') -> {logits.shape}")

    single = {k: v[:1] for k, v in inputs.items()}
    steps = []
    start = time.perf_counter()
    images = runtime.generate(single, OUTPUTS, timesteps=args.timesteps, seed=0,
                              progress=lambda label, i, n: steps.append(label))
    generate_s = time.perf_counter() - start
    print(f"generate({INPUTS} -> {OUTPUTS}, timesteps={args.timesteps}) in {generate_s:.1f} s: "
          + ", ".join(f"{k}: {v.shape} [{v.min():.2f}, {v.max():.2f}]" for k, v in images.items()))
    print(f"  {len(steps)} progress events (decoder passes and denoising steps); S1GRD in dB, LULC as class logits")
    rows = [("embed, batch 1", lambda: runtime.embed(single, standardize=True)),
            ("embed, batch 2", lambda: runtime.embed(inputs, standardize=True)),
            ("logits LULC, batch 1", lambda: runtime.logits(single, "LULC", standardize=True))]
    print(f"\nlatency, ONNX Runtime CPU, {args.iters} iterations after 3 warm-up (ms):")
    print(f"  {'call':<22} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8} {'min':>8}")
    for label, fn in rows:
        s = summarize(time_calls(fn, 3, args.iters))
        print(f"  {label:<22} " + " ".join(f"{s[k] * 1e3:>8.1f}" for k in ("mean", "p50", "p90", "p99", "min")))
    print(f"  {'generate, batch 1':<22} {generate_s * 1e3:>8.1f}  (one run, T={args.timesteps})")
    print("\nweights were RANDOM (--random-init): numbers show speed and plumbing, not meaning.")
    if what.startswith("RANDOM"):
        print("inputs were RANDOM too: the TerraMesh tiles were not found (see the warning above).", file=sys.stderr)
    assert "torch" not in sys.modules, "the runtime pulled in torch"
    return 0


if __name__ == "__main__":
    sys.exit(main())
