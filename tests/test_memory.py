"""Runtime memory: an embedding-only workload never opens (or even reads) a decoder or tokenizer
graph; ``tm-bench memory`` measures each workload in a fresh process (no timing assertions)."""
from __future__ import annotations

import json

import pytest

from tm_bench.memory import MemoryBenchConfig, format_memory_report, run_memory_benchmark
from tm_runtime import TerraMindRuntime
from tm_runtime.manifest import Manifest

from .conftest import random_inputs

EMBED_GRAPHS = {"embed_S2L2A", "embed_S1GRD", "encoder"}


def test_embed_only_never_loads_decoder_or_tokenizer_graphs(small_generate_export, monkeypatch):
    checked = []
    verify_graph = Manifest.verify_graph

    def recording(self, name):
        checked.append(name)
        verify_graph(self, name)

    monkeypatch.setattr(Manifest, "verify_graph", recording)
    rt = TerraMindRuntime(small_generate_export)
    assert checked == [] and rt.backend.session_seconds == {}  # loading reads no graph
    x = random_inputs(1, 0, ["S2L2A", "S1GRD"])
    rt.embed(x)
    rt.embed(x, layers="all", merge_method=None)
    assert set(rt.backend.session_seconds) == EMBED_GRAPHS
    assert sorted(checked) == sorted(EMBED_GRAPHS)  # each verified once, when first used
    # generate does open them (so the check above can fail)
    rt.generate({"S2L2A": x["S2L2A"]}, ["DEM"], timesteps=1, seed=0)
    assert {"decoder", "decoder_query_DEM", "decoder_head_DEM", "unet_DEM"} <= set(rt.backend.session_seconds)


def test_memory_benchmark_in_fresh_processes(small_generate_export, tmp_path):
    result = run_memory_benchmark(MemoryBenchConfig(small_generate_export, timesteps=1, threads=1,
                                                    workloads=("embed", "generate")), log=lambda s: None)
    embed, generate = result["workloads"]["embed"], result["workloads"]["generate"]
    assert set(embed["sessions"]) == EMBED_GRAPHS
    assert {"decoder", "decoder_head_DEM", "unet_DEM"} <= set(generate["sessions"])
    assert generate["outputs"] == ["DEM"]
    for w in (embed, generate):
        assert 0 < w["rss_after_imports_bytes"] <= w["peak_rss_bytes"]
        assert w["rss_after_workload_bytes"] <= w["peak_rss_bytes"]
    assert embed["session_graph_bytes"] < generate["session_graph_bytes"] <= result["export"]["bytes"]
    # the export recorded its own cost, and the report shows it
    assert result["export"]["export_peak_rss_bytes"] > 0 and result["export"]["export_seconds"] > 0
    report = format_memory_report(result)
    assert "embed created no decoder or tokenizer session" in report and "export (from the manifest)" in report
    json.dumps(result)  # --json writes it as is


def test_generate_calls_cover_outputs_that_are_also_inputs():
    """S2L2A S1GRD -> all six: no output may be an input of its own call, so two calls."""
    from tm_bench.memory import generate_calls

    calls = generate_calls({"S2L2A": 1, "S1GRD": 2}, ["S2L2A", "S1GRD", "DEM", "LULC"])
    assert [(sorted(src), dst) for src, dst in calls] == [(["S1GRD"], ["S2L2A", "DEM", "LULC"]), (["S2L2A"], ["S1GRD"])]
    assert [(sorted(src), dst) for src, dst in generate_calls({"S2L2A": 1, "S1GRD": 2}, ["DEM"])] == \
        [(["S1GRD", "S2L2A"], ["DEM"])]
    with pytest.raises(ValueError, match="S2L2A is the only input and also an output"):
        generate_calls({"S2L2A": 1}, ["S2L2A", "DEM"])
