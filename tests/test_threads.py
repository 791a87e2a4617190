"""embed may be called from several threads at once, including the very first (lazy) call."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tm_runtime import TerraMindRuntime

from .conftest import random_inputs


def test_concurrent_embed_matches_sequential(tiny_export):
    inputs = [random_inputs(1, seed=s, modalities=["S1GRD", "DEM"]) for s in range(6)]
    expected = [TerraMindRuntime(tiny_export).embed(x, merge_method="concat") for x in inputs]
    runtime = TerraMindRuntime(tiny_export)  # fresh: sessions are created under contention
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(lambda x: runtime.embed(x, merge_method="concat"), inputs * 3))
    for i, out in enumerate(got):
        np.testing.assert_allclose(out, expected[i % 6], rtol=0, atol=1e-6)
    # one session per graph, even though six threads raced to create them
    assert sorted(runtime.backend._sessions) == ["embed_DEM", "embed_S1GRD", "encoder"]
