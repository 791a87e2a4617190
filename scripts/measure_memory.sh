#!/usr/bin/env bash
# Export and runtime memory of one model size (issue 11), for BENCHMARKS.md "Memory".
#
#   bash scripts/measure_memory.sh SIZE [OUT_DIR] [--all-outputs]
#
# SIZE: tiny | small | base | large. Exports (random weights, official-size tokenizers)
#   S2L2A S1GRD -> S1GRD LULC            into OUT_DIR/SIZE_s1_lulc
#   S2L2A S1GRD -> all six image outputs into OUT_DIR/SIZE_all6   (with --all-outputs)
# each under /usr/bin/time -v, then runs `tm-bench memory` (load / embed / generate, a fresh process
# each) and `tm-bench embed` (batch 1, 2 threads) on it, and prints one summary table with the
# issue's bounds: export peak RSS <= 2 x export bytes + 1.5 GB; generate RSS <= export bytes + 1 GB.
# Needs the RAM the export needs (large: check `free -g` first; nothing else heavy at the same time).
set -euo pipefail
SIZE=${1:?usage: measure_memory.sh SIZE [OUT_DIR] [--all-outputs]}
OUT=${2:-exports/memory}
ALL=${3:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

configs=("${SIZE}_s1_lulc:S1GRD LULC")
[ "$ALL" = "--all-outputs" ] && configs+=("${SIZE}_all6:S2L2A S1GRD S1RTC DEM NDVI LULC")
for entry in "${configs[@]}"; do
  name=${entry%%:*}; outputs=${entry#*:}
  echo "== $name: export (S2L2A S1GRD -> $outputs)"
  # shellcheck disable=SC2086
  /usr/bin/time -v -o "$OUT/$name.export_time.txt" $PY -m tm_export.cli --model "$SIZE" --modalities S2L2A S1GRD \
    --output-modalities $outputs --random-init --seed 0 --out "$OUT/$name" --overwrite >"$OUT/$name.export.log" 2>&1
  echo "== $name: tm-bench memory"
  $PY -m tm_bench.cli memory "$OUT/$name" --threads 2 --json "$OUT/$name.memory.json" | tee "$OUT/$name.memory.txt"
  echo "== $name: tm-bench embed (batch 1, 2 threads)"
  $PY -m tm_bench.cli embed "$OUT/$name" --batch 1 --warmup 2 --iters 10 --threads 2 \
    --json "$OUT/$name.embed.json" >"$OUT/$name.embed.txt" 2>"$OUT/$name.embed.log"
done

$PY - "$OUT" "${configs[@]}" <<'PYEOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
GB = 1e9
print("\n| export | graphs | bytes on disk | export time | export peak RSS (bound 2x+1.5) | RSS embed peak | "
      "RSS generate peak (bound bytes+1) | embed p50 b1 |")
print("|---|---|---|---|---|---|---|---|")
for entry in sys.argv[2:]:
    name = entry.split(":")[0]
    mem = json.loads((out / f"{name}.memory.json").read_text())
    timed = (out / f"{name}.export_time.txt").read_text()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", timed).group(1)
    size = mem["export"]["bytes"]
    # The exporter's own figure (manifest): it resets the kernel's high-water mark between steps to
    # find each step's peak, so /usr/bin/time's "Maximum resident set size" only covers the last steps.
    export_peak = mem["export"]["export_peak_rss_bytes"]
    w = mem["workloads"]
    gen = w.get("generate", {}).get("peak_rss_bytes")
    embed = json.loads((out / f"{name}.embed.json").read_text())
    p50 = next((r["latency_s"]["p50"] for run in embed["runs"] for r in run["rows"]
                if r["name"] == "embed" and r["scope"] == "end-to-end" and r["batch"] == 1), None)
    ok = lambda v, bound: "" if v is None else (" ok" if v <= bound else " OVER")  # noqa: E731
    print(f"| {name} | {len(mem['export']['graph_bytes'])} | {size / GB:.2f} GB | {wall} | "
          f"{export_peak / GB:.2f} GB{ok(export_peak, 2 * size + 1.5 * GB)} | {w['embed']['peak_rss_bytes'] / GB:.2f} GB | "
          + (f"{gen / GB:.2f} GB{ok(gen, size + 1 * GB)}" if gen else "-")
          + f" | {'-' if p50 is None else f'{p50 * 1e3:.0f} ms'} |")
print(f"\n(GB = 1e9 bytes; details: {out}/*.memory.txt, *.embed.txt, *.export_time.txt)")
PYEOF
