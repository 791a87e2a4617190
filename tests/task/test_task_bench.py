"""tm-bench predict runs on a task export, alone and against terratorch on the same checkpoint."""
from __future__ import annotations

import pytest


def test_bench_predict_per_stage(multi_case):
    from tm_bench.predict import PredictBenchConfig, format_predict_report, run_predict_benchmark

    result = run_predict_benchmark(PredictBenchConfig(multi_case.export, batches=[1], warmup=0, iters=1),
                                   log=lambda s: None)
    stages = result["runs"][0]["runtime"]
    assert {"predict", "patch_embeddings", "encoder", "head"} <= set(stages)
    assert stages["encoder"]["p50"] < stages["predict"]["p50"]
    assert "batch 1" in format_predict_report(result)


@pytest.mark.parity
def test_bench_predict_compares_with_terratorch(multi_case):
    from tm_bench.predict import PredictBenchConfig, run_predict_benchmark

    if multi_case.task is None:
        pytest.skip("terratorch not installed")
    result = run_predict_benchmark(PredictBenchConfig(multi_case.export, batches=[1], warmup=0, iters=1,
                                                      compare_torch=True, ckpt=multi_case.ckpt), log=lambda s: None)
    run = result["runs"][0]
    assert set(run["interleaved"]) == {"onnxruntime", "terratorch_fp32", "terratorch_as_imported"}
    assert run["max_rel_diff_vs_runtime"]["terratorch_fp32"] <= 1e-4


def test_bench_predict_refuses_a_backbone_export(tiny_export):
    from tm_bench.cli import main

    assert main(["predict", str(tiny_export), "--iters", "1"]) == 2


def test_bench_predict_ort_spinning_is_recorded_and_only_for_ort_cpu(multi_case):
    from tm_bench.cli import main
    from tm_bench.predict import PredictBenchConfig, format_predict_report, run_predict_benchmark

    result = run_predict_benchmark(PredictBenchConfig(multi_case.export, batches=[1], warmup=0, iters=1,
                                                      ort_spinning=True), log=lambda s: None)
    assert result["settings"]["ort_spinning"] is True
    assert "ORT spinning within a run" in format_predict_report(result)
    assert main(["predict", str(multi_case.export), "--iters", "1", "--ort-spinning", "--backend", "openvino"]) == 2
