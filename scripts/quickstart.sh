#!/usr/bin/env bash
# The main job on a fresh machine: install, export TerraMind tiny (random weights, offline),
# run it through ONNX Runtime on real TerraMesh tiles, print validation and latency.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Prefer the CPU build of torch when none is installed (the exporter needs torch; the runtime does not).
$PY -c "import torch" 2>/dev/null || $PY -m pip install --quiet "torch==2.13.0" || true
$PY -m pip install --quiet -e ".[export,bench]"
exec $PY scripts/quickstart.py "$@"
