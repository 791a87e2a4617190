"""tm-bench generate: a smoke test of the stage breakdown (no timing assertions)."""
from __future__ import annotations

import pytest

from tm_bench.generate import GenerateBenchConfig, format_generate_report, run_generate_benchmark


@pytest.fixture(scope="module")
def gen_export(two_output_export):
    return two_output_export


@pytest.mark.parametrize("compare_torch", [False, True])
def test_generate_benchmark_structure(gen_export, compare_torch):
    result = run_generate_benchmark(GenerateBenchConfig(gen_export, ["S1GRD", "LULC"], timesteps=2, iters=1,
                                                        warmup=0, threads=1, compare_torch=compare_torch),
                                    log=lambda s: None)
    stages = result["ort"]["stages"]
    for label in ("encoder", "decoder S1GRD", "decoder LULC", "UNet step (S1GRD), per call", "LULC ViT decoder",
                  "sampling (host)", "DDIM update (host)"):
        assert label in stages and stages[label]["p50"] > 0
    # chained: the encoder runs once per output; T=2 -> two UNet calls
    assert result["graph_calls_per_generate"]["encoder"] == 2
    assert result["graph_calls_per_generate"]["unet_S1GRD"] == 2
    assert result["ort"]["end_to_end"]["n"] == 1
    if compare_torch:
        contenders = result["torch"]["contenders"]
        assert set(contenders) == {"onnxruntime", "pytorch_reference"}  # small tokenizers: no terratorch
        assert result["floor"]["flops"] > 0 and 0 < result["ort"]["floor_fraction"]
    assert "end to end" in format_generate_report(result)
