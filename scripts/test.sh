#!/usr/bin/env bash
# Install everything the tests need (terratorch included, for parity) and run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
$PY -m pip install --quiet -e ".[export,bench,dev,parity,coords,openvino,geo,ray]"
# Parity tests skip without terratorch; here they must run, so fail loudly if it cannot import.
$PY -c "import terratorch, tifffile, tokenizers, openvino, rasterio, ray; from importlib.metadata import version; print('terratorch', version('terratorch'))"
# Parity tests on real inputs skip without the TerraMesh tiles: say so loudly up front (the skips
# are listed again at the end by -rs), so that a run without them is never mistaken for a full one.
if ! ls ../shared/data/terramesh_examples/S2L2A/*.tif >/dev/null 2>&1; then
  echo "WARNING: TerraMesh tiles not found at $(cd .. && pwd)/shared/data/terramesh_examples:" \
       "the parity tests on real tiles will SKIP" >&2
fi
# pytest exits 5 when it collected no test: with `set -e` that fails the run, as it should.
# Two workers (pytest-xdist): files stay whole on one worker and big_memory tests share one (tests/conftest.py).
exec $PY -m pytest -q -rs --durations=15 -n 2 --dist loadgroup "$@"
