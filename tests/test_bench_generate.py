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


class DeviceLoopBackend:
    """A CPU backend dressed as a GPU one: ``run_device`` (what the runtime's device-resident
    diffusion loop calls) plus ``synchronize``, counted."""

    def __init__(self, inner):
        self.inner = inner
        self.device_calls: list[str] = []
        self.syncs = 0

    def run(self, name, feeds, outputs=None):
        return self.inner.run(name, feeds, outputs)

    def run_device(self, name, feeds, outputs=None):
        self.device_calls.append(name)
        names = outputs or ["x_prev"]
        return dict(zip(names, self.inner.run(name, {k: v for k, v in feeds.items()}, names)))

    def synchronize(self):
        self.syncs += 1


def test_device_resident_unet_steps_are_in_the_stage_table(gen_export):
    """On GPU backends the UNet steps go through ``run_device``: they must be timed too (the stage
    table on the H200 listed no UNet at all while it was ~75% of generate)."""
    import numpy as np

    from tm_bench.generate import TimingBackend
    from tm_runtime import TerraMindRuntime
    from tm_runtime.generation import _scheduler

    rt = TerraMindRuntime(gen_export, threads=1)
    device = DeviceLoopBackend(rt.backend)
    timing = TimingBackend(device, rt.manifest.decoder_graph)
    rt.backend = timing
    assert hasattr(rt.backend, "run_device")
    assert not hasattr(TimingBackend(object()), "run_device")  # a CPU backend stays a CPU backend
    rng = np.random.default_rng(0)
    x = {"S2L2A": rng.standard_normal((1, 12, 224, 224)).astype(np.float32)}
    rt.generate(x, ["S1GRD"], timesteps=3, seed=0, temperature=0.0, standardize=False)
    steps = len(_scheduler(3).timesteps)  # upstream's DDIM spacing: T=3 gives 4 steps
    assert device.device_calls == ["unet_S1GRD"] * steps
    assert device.syncs == steps
    assert timing.calls["unet_S1GRD"] == steps and timing.seconds["unet_S1GRD"] > 0
