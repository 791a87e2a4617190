"""tm-bench: statistics against numpy, and smoke runs of ``tm-bench embed`` (no timing asserts)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tm_bench.flops import model_flops
from tm_bench.stats import percentile, summarize

ROOT = Path(__file__).resolve().parents[1]


# -- statistics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 20, 101])
def test_percentiles_match_numpy_linear(n: int) -> None:
    samples = list(np.random.default_rng(n).exponential(0.05, size=n))
    for q in (0, 1, 25, 50, 90, 99, 100):
        assert percentile(samples, q) == pytest.approx(float(np.percentile(samples, q)), rel=1e-12, abs=0)


def test_summary_matches_numpy_on_known_data() -> None:
    samples = [0.5, 0.1, 0.3, 0.2, 0.4, 10.0, 0.25, 0.35, 0.15, 0.45]
    s = summarize(samples)
    assert s["n"] == len(samples)
    assert s["mean"] == pytest.approx(np.mean(samples))
    assert s["std"] == pytest.approx(np.std(samples))
    assert s["min"] == min(samples) and s["max"] == max(samples)
    for q in (50, 90, 99):
        assert s[f"p{q}"] == pytest.approx(np.percentile(samples, q))
    # The outlier moves the mean and the tail, not the median.
    assert s["p50"] == pytest.approx(np.median(samples)) and s["mean"] > s["p50"]


def test_stats_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_analytic_flops_of_tiny_are_the_textbook_count() -> None:
    # Written out independently: T tokens, per layer qkv + proj + 2 MLP matmuls, 2 FLOP per MAC.
    model = {"dim": 192, "encoder_depth": 12, "mlp": "gelu", "tokens_per_modality": 196}
    data = {"model": model, "encoder": {"graph": "encoder"},
            "modalities": {"S2L2A": {"graph": "embed_S2L2A", "channels": 12},
                           "S1GRD": {"graph": "embed_S1GRD", "channels": 2}}}
    t = 2 * 196
    linear = 12 * 2 * t * (192 * 576 + 192 * 192 + 2 * 192 * 768)
    embeds = 2 * 196 * (12 + 2) * 256 * 192
    flops = model_flops(data, ["S2L2A", "S1GRD"], batch=1)
    assert flops["total_without_attention"] == linear + embeds
    assert flops["attention"] == 12 * 2 * 2 * t * t * 192
    assert model_flops(data, ["S2L2A", "S1GRD"], batch=3)["total"] == 3 * flops["total"]


# -- smoke ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench_tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from tm_export.export import ExportConfig, export

    out = tmp_path_factory.mktemp("bench") / "tiny"
    export(ExportConfig(size="tiny", modalities=["S2L2A", "S1GRD"], out=out, random_init=True, seed=0,
                        validate=False), log=lambda s: None)
    return out


def _check_row(row: dict) -> None:
    for key in ("mean", "p50", "p90", "p99", "min", "max", "std"):
        assert row["latency_s"][key] > 0
    lat = row["latency_s"]
    assert lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert row["throughput_images_per_s"] > 0 and row["floor_fraction"] > 0 and row["floor_flops"] > 0


def test_embed_smoke_is_torch_free_and_writes_json(bench_tiny_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    # A fresh interpreter, so that "torch was never imported" means something.
    code = (
        "import sys; from tm_bench.cli import main; "
        f"rc = main(['embed', {str(bench_tiny_export)!r}, '--batch', '1', '2', '--iters', '2', '--warmup', '1', "
        f"'--threads', '1', '--json', {str(out)!r}, '--markdown', {str(md)!r}]); "
        "assert 'torch' not in sys.modules, 'tm-bench without --compare-torch imported torch'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ORT embed" in proc.stdout
    assert "| ORT embed |" in md.read_text()
    result = json.loads(out.read_text())
    assert result["settings"]["threads"] == 1 and result["settings"]["iters"] == 2
    assert result["machine"]["cpu_model"] and result["machine"]["usable_cores"] >= 1
    assert result["versions"]["onnxruntime"] and result["versions"]["numpy"]
    assert set(result["session_creation_s"]) == {"embed_S2L2A", "embed_S1GRD", "encoder"}
    assert result["memory"]["peak_rss_ort_bytes"] > 0
    # the floor takes the faster of numpy's and ONNX Runtime's sgemm (which one wins is the machine's call)
    gemm = result["gemm"]
    assert set(gemm) >= {"numpy", "onnxruntime"} and gemm["rate_source"] in ("numpy", "onnxruntime")
    assert gemm["rate_gflops"] == max(gemm["numpy"]["gflops_best"], gemm["onnxruntime"]["gflops_best"]) > 0
    assert [run["batch"] for run in result["runs"]] == [1, 2]
    for run in result["runs"]:
        names = [r["name"] for r in run["rows"]]
        assert names == ["embed_S2L2A", "embed_S1GRD", "encoder", "embed"]
        for row in run["rows"]:
            assert row["latency_s"]["n"] == 2
            _check_row(row)
        assert "speedup_of_ort" not in run



def test_embed_ort_spinning_reaches_the_sessions(bench_tiny_export: Path) -> None:
    """--ort-spinning goes through backend_options (sha256 checks kept): the sessions spin within
    a run and stop at its end, and the result says so."""
    from tm_bench.embed import EmbedBenchConfig, run_embed_benchmark

    result = run_embed_benchmark(EmbedBenchConfig(export_dir=bench_tiny_export, batches=[1], warmup=0, iters=1,
                                                  threads=1, ort_spinning=True), log=lambda s: None)
    assert result["settings"]["ort"]["allow_spinning"] == "1"
    assert result["settings"]["ort"]["force_spinning_stop"] == "1"
    with pytest.raises(ValueError, match="--ort-spinning applies to --backend ort-cpu only"):
        run_embed_benchmark(EmbedBenchConfig(export_dir=bench_tiny_export, batches=[1], warmup=0, iters=1,
                                             ort_spinning=True, backend="openvino"), log=lambda s: None)

@pytest.mark.parity
def test_embed_compare_torch_smoke(bench_tiny_export: Path, tmp_path: Path) -> None:
    pytest.importorskip("terratorch")
    from tm_bench.cli import main

    out = tmp_path / "compare.json"
    assert main(["embed", str(bench_tiny_export), "--iters", "2", "--warmup", "0", "--threads", "1",
                 "--gap-ms", "1", "--batch", "1", "2", "--compare-torch", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    run = result["runs"][0]
    # every batch's own rows are ours (a second batch's were once labelled with the last torch contender)
    for each in result["runs"]:
        assert {r["engine"] for r in each["rows"] if r["phase"] == "ort-only"} == {"onnxruntime"}
    from tm_bench.machine import cpu_has_bf16

    fp32 = {"torch_reference", "terratorch_eager"} | (set() if cpu_has_bf16() else {"terratorch_as_imported"})
    assert set(run["speedup_of_ort"]) == {"torch_reference", "terratorch_eager", "terratorch_as_imported"} | (
        {"terratorch_autocast_bf16"} if cpu_has_bf16() else set())
    for name in fp32:  # same weights, same inputs, fp32 math: the contenders agree
        assert run["max_abs_diff_vs_ort"][name]["max_rel"] < 1e-4
        assert run["accuracy_vs_terratorch_fp32"][name]["token_cosine_min"] > 0.99999
    assert result["torch"]["matmul_precision_after_import"] == "medium"  # what terratorch's import sets
    # FlopCounterMode on upstream sees the matmuls without attention, as the analytic count.
    assert run["flops"]["flop_counter"] == run["flops"]["total_without_attention"]
    assert result["torch"]["torch_settings"]["matmul_precision_used"] == "highest"
    engines = {r["engine"] for r in run["rows"] if r["phase"] == "interleaved"}
    assert engines == {"onnxruntime"} | set(run["speedup_of_ort"])
    for row in run["rows"]:
        _check_row(row)


# -- the ORT-only fused variant (tm_export.optimize) ----------------------------------------------
@pytest.mark.parametrize("mode", ["attention", "mha"])
def test_fused_export_matches_portable_and_runs(bench_tiny_export: Path, tmp_path: Path, mode: str) -> None:
    import onnx

    from tm_export.optimize import optimize_export
    from tm_runtime import TerraMindRuntime

    out = tmp_path / f"fused_{mode}"
    manifest = optimize_export(bench_tiny_export, out, log=lambda s: None, mode=mode)
    entry = manifest["graphs"]["encoder"]
    assert entry["optimized"]["fused_attention"] == 12 and entry["optimized"]["portable"] is False
    assert entry["optimized"]["check_vs_portable"]["max_rel"] < 1e-5
    ops = [n.op_type for n in onnx.load(str(out / entry["file"])).graph.node]
    assert "Softmax" not in ops
    assert ops.count("Attention" if mode == "attention" else "MultiHeadAttention") == 12
    # The copy is a valid export (sha256 updated) and embeds like the portable one.
    rng = np.random.default_rng(3)
    inputs = {"S2L2A": rng.standard_normal((2, 12, 224, 224), dtype=np.float32),
              "S1GRD": rng.standard_normal((2, 2, 224, 224), dtype=np.float32)}
    fused = TerraMindRuntime(out, threads=1).embed(inputs, layers="all")
    portable = TerraMindRuntime(bench_tiny_export, threads=1).embed(inputs, layers="all")
    for a, b in zip(fused, portable):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
