"""embed's chain (patch embeddings -> concatenation -> encoder) compiled by OpenVINO as one model,
against ONNX Runtime and against the same graphs run one by one; when it is not fused, and why.
(Tokenised inputs and coords take embed's general path: tests/test_tokenized_inputs.py, tests/test_coords.py.)"""
from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the OpenVINO backend needs pip install 'tm-deploy[openvino]'")

from tm_runtime import TerraMindRuntime  # noqa: E402
from tm_runtime.backends.openvino import OpenVinoError  # noqa: E402
from tm_runtime.embed_chain import EmbedChain, embed_chain  # noqa: E402

from ..conftest import random_inputs  # noqa: E402
from .test_reduced_precision import FakeCore, _backend, _real_bf16  # noqa: E402


def _ov(export, **options):
    return TerraMindRuntime(export, backend="openvino", backend_options={"cache_dir": None, "threads": 2, **options})


@pytest.fixture(scope="module")
def engines(tiny_export):
    return {"ort": TerraMindRuntime(tiny_export, threads=2), "fused": _ov(tiny_export),
            "separate": _ov(tiny_export, fuse_embed=False)}


def _close(got, ref, rtol):
    if isinstance(ref, dict):
        assert list(got) == list(ref)
        for k in ref:
            _close(got[k], ref[k], rtol)
    elif isinstance(ref, list):
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            _close(g, r, rtol)
    else:
        assert got.shape == ref.shape
        scale = max(float(np.abs(ref).max()), 1e-30)
        assert float(np.abs(got.astype(np.float64) - ref).max()) / scale <= rtol


CALLS = [{}, {"merge_method": "concat"}, {"merge_method": "dict"}, {"merge_method": None, "layers": [0, 5]},
         {"merge_method": "max", "layers": "all"}, {"merge_method": None, "layers": [11, -1, 3, 3]}]


def test_fused_embed_equals_onnxruntime_and_graph_by_graph(tiny_export, engines):
    """Every merge method and layer choice (repeated layers too: OpenVINO cannot compile a model listing a
    result twice), three modalities in two orders (the tokens are concatenated in input order: a fused
    Concat in the wrong order would show here), one modality alone, batch 2."""
    x = random_inputs(2, 3)
    chains = []
    for feed in (x, dict(reversed(list(x.items()))), {"S1GRD": x["S1GRD"]}):
        fused = _ov(tiny_export)  # a fresh one per input order: at most MAX_FUSED_MODELS chains each
        for kwargs in CALLS:
            ref = engines["ort"].embed(feed, **kwargs)
            _close(fused.embed(feed, **kwargs), ref, 1e-4)
            _close(engines["separate"].embed(feed, **kwargs), fused.embed(feed, **kwargs), 1e-5)
        facts = fused.backend.describe()
        # one chain per encoder-output choice: the last layer; 0 and 5; all; 11 and 3
        assert facts["unfused_chains"] == {} and len(facts["fused_chains"]) == facts["fused_models"] == 4
        chains += facts["fused_chains"]
    assert {"chain[embed_S2L2A+embed_S1GRD+embed_DEM>encoder:layer_11]",
            "chain[embed_DEM+embed_S1GRD+embed_S2L2A>encoder:layer_11]", "chain[embed_S1GRD>encoder:layer_11]",
            "chain[embed_S1GRD>encoder:layer_11,layer_3]"} <= set(chains)
    separate = engines["separate"].backend.describe()
    assert separate["fused_chains"] == [] and set(separate["unfused_chains"].values()) == {"fuse_embed=False"}


def test_fused_models_are_capped_then_graphs_run_one_by_one(tiny_export, engines):
    """Each fused model holds a copy of the encoder: past MAX_FUSED_MODELS, calls run graph by graph."""
    from tm_runtime.backends.openvino import MAX_FUSED_MODELS

    rt = _ov(tiny_export)
    x = random_inputs(1, 6)
    for layer in range(MAX_FUSED_MODELS + 2):
        _close(rt.embed(x, layers=layer), engines["ort"].embed(x, layers=layer), 1e-4)
    facts = rt.backend.describe()
    assert facts["fused_models"] == MAX_FUSED_MODELS and facts["unfused_chains"] == {}
    assert sum(1 for name, _ in rt.backend._compiled if name.startswith("chain[")) == MAX_FUSED_MODELS
    assert ("encoder", (("tokens", (1, 588, 192)),)) in rt.backend._compiled  # the rest, graph by graph


def test_the_chain_of_an_embed_call(tiny_export):
    rt = TerraMindRuntime(tiny_export)
    chain = embed_chain(rt.manifest, ["S1GRD", "S2L2A"], ["layer_3"])
    assert chain == EmbedChain((("S1GRD", "embed_S1GRD"), ("S2L2A", "embed_S2L2A")), "encoder", ("layer_3",),
                               (196, 196))
    assert chain.graphs == ["embed_S1GRD", "embed_S2L2A", "encoder"]


def test_a_chain_that_fails_to_compile_runs_graph_by_graph(tiny_export, engines):
    rt = _ov(tiny_export)

    def broken(chain, shapes):
        raise OpenVinoError("embed chain X cannot be compiled as one model: boom")

    rt.backend._compile_chain = broken
    x = random_inputs(1, 1)
    with pytest.warns(UserWarning, match="boom; running its graphs one by one"):
        got = rt.embed(x)
    _close(got, engines["separate"].embed(x), 1e-5)
    assert "boom" in next(iter(rt.backend.unfused.values()))
    rt.embed(x)  # known unfusable: no second attempt, no second warning


def test_bf16_chain_is_compiled_bf16_with_its_patch_embeddings_rewritten(tiny_export):
    """On any CPU (a fake core that reports BF16): the fused model is compiled with the bf16 hint and has
    no convolution left (OpenVINO's bf16 patchify convolution is wrong; see openvino_patchify)."""
    core = FakeCore(["FP32", "BF16"])
    backend = _backend(tiny_export, core, precision="bf16")
    chain = embed_chain(TerraMindRuntime(tiny_export).manifest, ["S2L2A", "S1GRD"], ["layer_11"])
    shapes = (("S1GRD", (1, 2, 224, 224)), ("S2L2A", (1, 12, 224, 224)))
    assert backend.fused_chain(chain, shapes) is not None
    compiled = core.compiled[chain.key]
    assert compiled["INFERENCE_PRECISION_HINT"] == "bf16"
    types = [op.get_type_name() for op in compiled["source"].get_ops()]
    assert "Convolution" not in types and types.count("Concat") >= 1
    # one of the chain's graphs kept in f32 (a patch embedding the rewrite did not recognise): not fused
    backend = _backend(tiny_export, FakeCore(["FP32", "BF16"]), precision="bf16")
    backend.fp32_graphs = sorted({*backend.fp32_graphs, "embed_S1GRD"})
    assert backend.fused_chain(chain, shapes) is None
    assert backend.unfused[chain.key].startswith("mixed precisions: embed_S2L2A bf16, embed_S1GRD fp32")


@pytest.mark.skipif(not _real_bf16(), reason="this CPU has no bf16 (OpenVINO's OPTIMIZATION_CAPABILITIES lacks BF16)")
def test_bf16_fused_embed_matches_graph_by_graph(tiny_export, engines):
    fused, separate = _ov(tiny_export, precision="bf16"), _ov(tiny_export, precision="bf16", fuse_embed=False)
    x = random_inputs(1, 2)
    a, b, ref = fused.embed(x, merge_method=None), separate.embed(x, merge_method=None), engines["ort"].embed(
        x, merge_method=None)
    for got in (a, b):
        cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        assert cos.min() > 0.999, cos.min()
    assert fused.backend.describe()["fused_chains"]


def test_encode_context_shares_embeds_chain_and_gives_the_context_embeddings(engines):
    """logits / coords_logits encode through the same chain (and, on OpenVINO, the same compiled model as
    embed's last layer), which also returns the inputs' position + modality embeddings."""
    x = engines["ort"].prepare(random_inputs(1, 4))
    ref_encoded, ref_emb = engines["ort"].encode_context(x)
    for name in ("fused", "separate"):
        encoded, emb = engines[name].encode_context(x)
        _close(encoded, ref_encoded, 1e-4)
        np.testing.assert_allclose(emb, ref_emb, rtol=1e-6, atol=1e-6)
    assert emb.shape == (1, 3 * 196, 192)
    backend = engines["fused"].backend
    before = set(backend.describe()["fused_chains"])
    engines["fused"].embed(x)  # layers=-1: the chain encode_context compiled
    assert "chain[embed_S2L2A+embed_S1GRD+embed_DEM>encoder:layer_11]" in before
    assert set(backend.describe()["fused_chains"]) == before


def test_tm_bench_times_the_fused_chain_as_one_stage(tiny_export):
    """...and graph by graph where it is not fused (fuse_embed=False, or a chain the backend declines)."""
    from tm_bench.generate import TimingBackend, _stage_label

    rt = _ov(tiny_export)
    rt.backend = timing = TimingBackend(rt.backend)
    rt.embed(random_inputs(1, 5))
    (key,) = timing.seconds
    assert key.startswith("chain[") and timing.calls[key] == 1
    assert _stage_label(key) == "patch embeddings + encoder (one model)"
    rt = _ov(tiny_export, fuse_embed=False)
    rt.backend = timing = TimingBackend(rt.backend)
    rt.embed(random_inputs(1, 5))
    assert set(timing.seconds) == {"embed_S2L2A", "embed_S1GRD", "embed_DEM", "encoder"}


def test_fused_chain_comes_from_the_model_cache_in_a_second_runtime(tiny_export, tmp_path):
    """OpenVINO caches a model built in memory (hashing it) like one read from a file."""
    x = random_inputs(1, 7)
    first = _ov(tiny_export, cache_dir=str(tmp_path))
    first.embed(x)
    second = _ov(tiny_export, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(second.embed(x), first.embed(x))
    (model,) = [m for (name, _), m in second.backend._compiled.items() if name.startswith("chain[")]
    assert bool(model.get_property("LOADED_FROM_CACHE"))
