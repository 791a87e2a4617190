"""Generation through the graphs vs the eager reference (same numpy Generator, draw for draw),
tokenize/decode_tokens building blocks, and bad input."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tm_export.export import ExportConfig, build_reference, build_tokenizers, export
from tm_export.reference.generation import reference_generate
from tm_runtime import TerraMindRuntime

from .conftest import random_inputs

INPUTS, OUTPUTS = ["S2L2A", "S1GRD"], ["DEM", "LULC"]


def config(out: Path) -> ExportConfig:
    return ExportConfig(size="tiny", modalities=INPUTS, output_modalities=OUTPUTS, out=out, random_init=True,
                        seed=5, tokenizer_size="small")


@pytest.fixture(scope="module")
def gen_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "tiny"
    export(config(out), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def runtime(gen_export):
    return TerraMindRuntime(gen_export)


@pytest.fixture(scope="module")
def reference(gen_export):
    cfg = config(gen_export)
    model, _ = build_reference(cfg, log=lambda s: None)
    tokenizers, _ = build_tokenizers(cfg, list(model.targets), log=lambda s: None)
    return model, tokenizers


def raw_inputs(batch=2, seed=0):
    x = random_inputs(batch, seed, INPUTS)
    x["S2L2A"] = x["S2L2A"] * 2000 + 1500  # roughly the pretraining statistics
    x["S1GRD"] = x["S1GRD"] * 5 - 15
    return x


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("temperature, top_p, top_k, chained", [(1.0, 0.8, 0, True), (0.7, 1.0, 50, False),
                                                                 (0.0, 0.8, 0, True)])
def test_generate_matches_reference_draw_for_draw(runtime, reference, temperature, top_p, top_k, chained):
    model, tokenizers = reference
    x = raw_inputs()
    images, tokens = runtime.generate(x, OUTPUTS, timesteps=3, seed=11, temperature=temperature, top_p=top_p,
                                      top_k=top_k, return_tokens=True, chained=chained)
    ref_images, ref_tokens = reference_generate(model, tokenizers, x, OUTPUTS, np.random.default_rng(11),
                                                timesteps=3, temperature=temperature, top_p=top_p, top_k=top_k,
                                                chained=chained)
    for name in OUTPUTS:
        # Logits agree to ~1e-6, so a uniform that lands within that of a CDF boundary can pick the
        # neighbouring token: allow a rare flip when sampling, none at argmax.
        flips = int((tokens[name] != ref_tokens[name]).sum())
        assert flips <= (0 if temperature == 0 else 2), (name, flips)
        assert images[name].shape == ref_images[name].shape
        if flips == 0 and (name == OUTPUTS[0] or int((tokens[OUTPUTS[0]] != ref_tokens[OUTPUTS[0]]).sum()) == 0):
            assert rel(images[name], ref_images[name]) < 1e-4, name
    assert images["DEM"].shape == (2, 1, 224, 224) and images["LULC"].shape == (2, 10, 224, 224)
    assert tokens["DEM"].shape == (2, 14, 14) and tokens["DEM"].max() < 15360 and tokens["LULC"].max() < 4375


def test_seed_reproducible_and_outputs_in_range(runtime):
    x = raw_inputs(1, seed=1)
    a = runtime.generate(x, ["DEM"], timesteps=2, seed=3)
    b = runtime.generate(x, ["DEM"], timesteps=2, seed=3)
    c = runtime.generate(x, ["DEM"], timesteps=2, seed=4)
    np.testing.assert_array_equal(a["DEM"], b["DEM"])
    assert not np.array_equal(a["DEM"], c["DEM"])
    # diffusion outputs are clamped to [-1, 1] in standardised units, then de-standardised
    lo, hi = 670.665 - 951.272, 670.665 + 951.272
    assert a["DEM"].min() >= lo - 1e-2 and a["DEM"].max() <= hi + 1e-2
    raw = runtime.generate(x, ["DEM"], timesteps=2, seed=3, standardize=False)  # inputs given standardised
    assert np.abs(raw["DEM"]).max() <= 1.0 + 1e-6


def test_chaining_conditions_later_outputs(runtime):
    x = raw_inputs(1, seed=6)
    chained = runtime.generate(x, ["DEM", "LULC"], temperature=0.0, timesteps=1, seed=0)
    independent = runtime.generate(x, ["DEM", "LULC"], temperature=0.0, timesteps=1, seed=0, chained=False)
    alone = runtime.generate(x, ["LULC"], temperature=0.0)
    np.testing.assert_array_equal(chained["DEM"], independent["DEM"])  # the first output sees only the inputs
    np.testing.assert_array_equal(independent["LULC"], alone["LULC"])
    assert not np.allclose(chained["LULC"], independent["LULC"])  # DEM's tokens changed the LULC context


def test_argmax_equals_argmax_of_logits(runtime):
    x = raw_inputs(1, seed=2)
    _, tokens = runtime.generate(x, ["LULC"], temperature=0.0, return_tokens=True)
    logits = runtime.logits(x, "LULC", standardize=True)
    np.testing.assert_array_equal(tokens["LULC"].reshape(1, -1), logits.argmax(-1))


def test_building_blocks(runtime, reference):
    model, tokenizers = reference
    rng = np.random.default_rng(0)
    image = rng.standard_normal((2, 1, 224, 224)).astype(np.float32)
    ids = runtime.tokenize("DEM", image)
    assert ids.shape == (2, 14, 14) and ids.dtype == np.int32
    import torch

    with torch.no_grad():
        _, ref_ids = tokenizers["DEM"].encoder(torch.from_numpy(image))
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    noise = rng.standard_normal((2, 1, 224, 224)).astype(np.float32)
    std_units = runtime.decode_tokens("DEM", ids, timesteps=2, noise=noise)
    assert np.abs(std_units).max() <= 1.0 + 1e-6
    metres = runtime.decode_tokens("DEM", ids, timesteps=2, noise=noise, standardize=True)
    np.testing.assert_allclose(metres, std_units * 951.272 + 670.665, rtol=1e-5, atol=1e-2)
    flat = runtime.decode_tokens("DEM", ids.reshape(2, 196).astype(np.int64), timesteps=2, noise=noise)
    np.testing.assert_array_equal(flat, std_units)
    logits = runtime.decode_tokens("LULC", np.zeros((1, 14, 14), np.int64))
    assert logits.shape == (1, 10, 224, 224)


def test_noise_is_used(runtime):
    x = raw_inputs(1, seed=4)
    z = np.zeros((1, 1, 224, 224), np.float32)
    a = runtime.generate(x, ["DEM"], timesteps=2, seed=1, noise={"DEM": z})
    b = runtime.generate(x, ["DEM"], timesteps=2, seed=2, noise={"DEM": z}, temperature=0.0)
    c = runtime.generate(x, ["DEM"], timesteps=2, seed=1, noise={"DEM": z}, temperature=0.0)
    np.testing.assert_array_equal(b["DEM"], c["DEM"])  # argmax + fixed noise: no randomness left
    assert a["DEM"].shape == (1, 1, 224, 224)


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"output_modalities": ["MARS"]}, ValueError, "unknown output modality 'MARS'"),
    ({"output_modalities": ["S1RTC"]}, ValueError, "S1RTC was not exported.*--output-modalities S1RTC"),
    ({"output_modalities": []}, ValueError, "output_modalities is empty"),
    ({"output_modalities": ["DEM", "dem"]}, ValueError, "listed twice"),
    ({"timesteps": 0}, ValueError, "timesteps must be between 1 and 1000"),
    ({"timesteps": 2.5}, TypeError, "timesteps must be an int"),
    ({"top_p": 0.0}, ValueError, "top_p"),
    ({"top_p": 1.5}, ValueError, "top_p"),
    ({"temperature": -1.0}, ValueError, "temperature must be"),
    ({"top_k": -3}, ValueError, "top_k must be >= 0"),
    ({"noise": {"DEM": np.zeros((1, 1, 64, 64), np.float32)}}, ValueError, r"DEM noise: expected shape \(1, 1, 224, 224\)"),
    ({"noise": {"S1RTC": np.zeros((1, 2, 224, 224), np.float32)}}, ValueError, "noise given for S1RTC"),
])
def test_generate_bad_arguments(runtime, kwargs, error, pattern):
    args = {"output_modalities": ["DEM"], **kwargs}
    with pytest.raises(error, match=pattern):
        runtime.generate(raw_inputs(1), **args)


def test_output_that_is_also_an_input(tmp_path):
    out = tmp_path / "e"
    export(ExportConfig(size="tiny", modalities=["S1GRD", "DEM"], output_modalities=["DEM"], out=out,
                        random_init=True, tokenizer_size="small", validate=False), log=lambda s: None)
    rt = TerraMindRuntime(out)
    x = random_inputs(1, 0, ["S1GRD", "DEM"])
    with pytest.raises(ValueError, match="DEM is both an input and an output"):
        rt.generate(x, ["DEM"])
    assert rt.generate({"S1GRD": x["S1GRD"]}, ["DEM"], timesteps=1)["DEM"].shape == (1, 1, 224, 224)


def test_bad_tokens(runtime):
    with pytest.raises(ValueError, match=r"DEM tokens: ids must lie in \[0, 15360\), got values in \[15360, 15360\]"):
        runtime.decode_tokens("DEM", np.full((1, 14, 14), 15360))
    with pytest.raises(ValueError, match=r"LULC tokens: ids must lie in \[0, 4375\)"):
        runtime.decode_tokens("LULC", np.full((1, 14, 14), -1))
    with pytest.raises(TypeError, match="DEM tokens: expected integer ids"):
        runtime.decode_tokens("DEM", np.zeros((1, 14, 14), np.float32))
    with pytest.raises(ValueError, match=r"DEM tokens: expected shape \(B, 14, 14\)"):
        runtime.decode_tokens("DEM", np.zeros((1, 10, 10), np.int64))
    with pytest.raises(ValueError, match="DEM: expected 1 channels"):
        runtime.tokenize("DEM", np.zeros((1, 3, 224, 224), np.float32))


@pytest.mark.parametrize("scheme", ["roar", "maskgit"])
def test_multi_step_decoding(runtime, scheme):
    x = raw_inputs(2, seed=8)
    images, tokens = runtime.generate(x, ["LULC"], decoding_steps=3, scheme=scheme, seed=1, return_tokens=True)
    again = runtime.generate(x, ["LULC"], decoding_steps=3, scheme=scheme, seed=1)
    np.testing.assert_array_equal(images["LULC"], again["LULC"])
    assert tokens["LULC"].shape == (2, 14, 14) and tokens["LULC"].max() < 4375
    one_pass = runtime.generate(x, ["LULC"], temperature=0.0, return_tokens=True)[1]["LULC"]
    three = runtime.generate(x, ["LULC"], temperature=0.0, decoding_steps=3, scheme=scheme, return_tokens=True)[1]
    # later passes are conditioned on the tokens decoded earlier, so the argmax can change
    assert (one_pass != three["LULC"]).any()
    with pytest.raises(ValueError, match="decoding_steps must be between 1 and 196"):
        runtime.generate(x, ["LULC"], decoding_steps=0)


def test_device_resident_loop_matches_host_loop(runtime):
    """A backend with run_device (as the GPU ones) gets the fused-update loop: x never comes back
    to the host until the end. Emulated here with host arrays behind an OrtValue-like wrapper."""
    from tm_runtime.backends import OrtBackend

    class Held:  # what a device array looks like to the runtime: only .numpy() brings it back
        def __init__(self, array):
            self.array = array

        def numpy(self):
            return self.array

    class FakeDevice(OrtBackend):
        uploads = 0

        def run_device(self, name, feeds, outputs=None):
            host = {}
            for key, value in feeds.items():
                if isinstance(value, Held):
                    host[key] = value.array  # stayed "on the device"
                else:
                    FakeDevice.uploads += value.nbytes if key == "x_t" else 0
                    host[key] = value
            values = self.run(name, host, outputs)
            return dict(zip(outputs, (Held(v) for v in values)))

    ids = np.random.default_rng(3).integers(0, 15360, (2, 14, 14))
    noise = np.random.default_rng(4).standard_normal((2, 1, 224, 224)).astype(np.float32)
    host_loop = runtime.decode_tokens("DEM", ids, timesteps=4, noise=noise)
    device_rt = TerraMindRuntime(runtime.manifest.directory,
                                 backend=FakeDevice({n: runtime.manifest.graph_path(n) for n in runtime.manifest.graphs}))
    device_loop = device_rt.decode_tokens("DEM", ids, timesteps=4, noise=noise)
    assert FakeDevice.uploads == noise.nbytes  # the image went up once, for the first step only
    assert rel(device_loop, host_loop) < 1e-5
