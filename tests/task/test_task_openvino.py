"""predict on the OpenVINO backend (fp32): the same logits as ONNX Runtime, with the patch embeddings and
the encoder compiled as one model (tm_runtime.embed_chain) or graph by graph."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino", reason="the OpenVINO backend needs pip install 'tm-deploy[openvino]'")

from tm_runtime import TerraMindRuntime  # noqa: E402

from .test_task_runtime import multi_inputs  # noqa: E402


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def _ov(export, fuse: bool) -> TerraMindRuntime:
    return TerraMindRuntime(export, backend="openvino",
                            backend_options={"cache_dir": None, "threads": 2, "fuse_embed": fuse})


@pytest.mark.parametrize("fuse", [True, False], ids=["fused_chain", "graph_by_graph"])
def test_predict_on_openvino_matches_onnxruntime(multi_case, floods_tiny, fuse):
    """concat merge of a band subset and S1GRD over 3 dates (date subsets), and sen1floods11's mean merge."""
    rng = np.random.default_rng(3)
    floods = {m: rng.standard_normal((2, n, 224, 224)).astype(np.float32)
              for m, n in (("S2L1C", 13), ("S1GRD", 2))}
    for export, x in ((multi_case.export, multi_inputs(batch=2)), (floods_tiny.export, floods)):
        ref = TerraMindRuntime(export, threads=2).predict(x, standardize=False)
        rt = _ov(export, fuse)
        assert _rel(rt.predict(x, standardize=False), ref) <= 1e-4
        chains = rt.backend.describe()["fused_chains"]
        assert (len(chains) == 1) if fuse else not chains
        if fuse:  # the task's selected layers (terratorch's SelectIndices) are the chain's outputs
            layers = ",".join(f"layer_{i}" for i in rt.task.layers)
            assert chains[0].endswith(f"encoder:{layers}]"), chains


def test_tm_bench_predict_stages_show_the_fused_chain(multi_case):
    from tm_bench.generate import TimingBackend
    from tm_bench.predict import _stages

    rt = _ov(multi_case.export, True)
    rt.backend = timing = TimingBackend(rt.backend)
    rt.predict(multi_inputs(), standardize=False)
    stages = _stages(rt, timing, total=10.0)
    assert stages["patch embeddings + encoder (one model)"] > 0
    assert stages["patch_embeddings"] == stages["encoder"] == 0.0 and stages["head"] > 0
