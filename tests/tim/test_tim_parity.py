"""TiM backbone parity with upstream terratorch ``terramind_v1_tiny_tim`` at temperature 0 (argmax:
deterministic on both sides), every parameter and buffer randomised, real TerraMesh tiles.

Two exports:

* ``shared``: the backbone as ``pretrained=True`` builds it, the generation model (``sampler.model``)
  and the embedding encoder holding the same enc-dec weights; exported from that enc-dec state_dict
  (an official ``TerraMind_v1_tiny.pt`` stand-in), TiM modalities LULC then NDVI, chained.
* ``separate``: the backbone's state_dict with the frozen enc-dec and the embedding encoder drawn
  independently, as after ``terratorch fit``; exported from that state_dict (TiM backbone key
  layout), TiM modality LULC.

Test-only patch of upstream: its TiM backbone builds official-size tokenizers for the TiM
modalities (184 M parameters for LULC, 290 M for NDVI, ~30 s) that the TiM step never runs when
the inputs are raw images; ``build_tokenizer`` is replaced by an empty dict while the model is built.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from ..parity.upstream import import_terratorch, randomize_state, rel_error, terramesh_tile

pytestmark = pytest.mark.parity
REGISTRY = import_terratorch()

import torch  # noqa: E402
from terratorch.models.backbones.terramind.model import terramind_tim  # noqa: E402

from tm_export.export import ExportConfig, export  # noqa: E402
from tm_export.tim import TimSettings  # noqa: E402
from tm_runtime import TerraMindRuntime  # noqa: E402
from tm_runtime.modalities import get_modality  # noqa: E402
from tm_runtime import tim as tim_module  # noqa: E402
from tm_runtime.tim import generate_tim_tokens  # noqa: E402

TOL = 1e-4
INPUTS = ["S2L2A", "S1RTC"]
INPUT_SETS = [("S2L2A", "S1RTC"), ("S1RTC",)]
KEYS = {"LULC": "tok_lulc@224", "NDVI": "tok_ndvi@224"}


def build_upstream(tim_modalities: list[str], merge_method: str = "mean"):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(terramind_tim, "build_tokenizer", lambda *args, **kwargs: torch.nn.ModuleDict())
        model = REGISTRY.build("terramind_v1_tiny_tim", pretrained=False, modalities=INPUTS,
                               tim_modalities=tim_modalities, tim_temps=0.0, merge_method=merge_method)
    torch.set_float32_matmul_precision("highest")
    return model.eval()


def shared_weights(model, seed: int) -> dict:
    """Random enc-dec weights in ``sampler.model`` and copied into the embedding encoder, as
    terratorch's checkpoint filter does with the official checkpoint; returns the enc-dec state."""
    randomize_state(model.sampler.model, seed)
    encdec = model.sampler.model.state_dict()
    full = model.state_dict()
    for key in full:
        if not key.startswith(("sampler.", "tokenizer.")) and key in encdec:
            full[key] = encdec[key]
    model.load_state_dict(full, strict=True)
    return {k: v.clone() for k, v in model.sampler.model.state_dict().items()}


def export_tim(root, ckpt_state: dict, tim_modalities: list[str]) -> TerraMindRuntime:
    torch.save(ckpt_state, root / "weights.pt")
    out = root / "export"
    # The runtime's outputs are compared with terratorch below: no own validation, no simplifier.
    export(ExportConfig(size="tiny", modalities=INPUTS, out=out, ckpt=root / "weights.pt", validate=False,
                        simplify=False, tim=TimSettings(tuple(tim_modalities))), log=lambda s: None)
    return TerraMindRuntime(out)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    model = build_upstream(["LULC", "NDVI"])
    state = shared_weights(model, seed=31)
    return model, export_tim(tmp_path_factory.mktemp("tim_shared"), state, ["LULC", "NDVI"])


@pytest.fixture(scope="module")
def separate(tmp_path_factory):
    model = build_upstream(["LULC"])
    randomize_state(model, seed=32)  # generation model and embedding encoder drawn independently
    return model, export_tim(tmp_path_factory.mktemp("tim_separate"), model.state_dict(), ["LULC"])


def real_inputs(names, batch: int = 2) -> dict[str, np.ndarray]:
    return {m: np.stack([terramesh_tile(m, i) for i in range(batch)]) for m in names}


def standardized(x: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in x.items():
        mod = get_modality(name)
        mean = np.asarray(mod.mean, np.float32)[None, :, None, None]
        std = np.asarray(mod.std, np.float32)[None, :, None, None]
        out[name] = torch.from_numpy((value - mean) / std)
    return out


def run_upstream(model, x: dict[str, np.ndarray], merge_method):
    """Upstream's embedding and the TiM ids its sampler wrote."""
    captured = {}
    generate = model.sampler.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        captured.update({k: v["tensor"].clone() for k, v in out.items() if k in KEYS.values()})
        return out

    model.merge_method = merge_method  # read at forward time
    if merge_method == "concat":  # built with 'mean', the model lacks it; upstream leaves it uninitialised,
        model.missing_mod_token = torch.nn.Parameter(torch.zeros(model.encoder_norm.weight.shape[0]))  # ours: zeros
    threads = torch.get_num_threads()
    # One thread: this small forward gains little from two, and on a busy machine torch's spinning
    # threads made it 4x slower (measured: 13 s vs 3.4 s at a load of 8 on 2 cores).
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(model.sampler, "generate", spy)
            out = model(standardized(x))
    finally:
        torch.set_num_threads(threads)
    return out, captured


def check_embedding(got, ref, what: str) -> None:
    for i, (o, u) in enumerate(zip(got, ref)):
        if isinstance(u, dict):
            assert list(o) == list(u), f"{what} layer {i}: keys {list(o)} vs {list(u)}"
            for k in u:
                err = rel_error(o[k], u[k].numpy())
                assert err <= TOL, f"{what} layer {i} {k}: relative error {err:.2e}"
        else:
            assert o.shape == tuple(u.shape), f"{what} layer {i}: {o.shape} vs {tuple(u.shape)}"
            err = rel_error(o, u.numpy())
            assert err <= TOL, f"{what} layer {i}: relative error {err:.2e}"


# Each export sees both merges and both input sets (not every combination: upstream forwards are
# slow); 'concat' once, with S2L2A missing (one zero block, after the input and the TiM modality).
CASES = [("shared", INPUT_SETS[0], "mean"), ("shared", INPUT_SETS[1], "dict"),
         ("separate", INPUT_SETS[0], "dict"), ("separate", INPUT_SETS[1], "mean"),
         ("separate", INPUT_SETS[1], "concat")]


@pytest.mark.parametrize("which, names, merge_method", CASES, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_embed_matches_terratorch_tim(request, which, names, merge_method):
    model, rt = request.getfixturevalue(which)
    x = real_inputs(names, batch=2 if len(names) > 1 else 1)
    ref, ref_ids = run_upstream(model, x, merge_method)
    ids = {}

    def spy(*args, **kwargs):  # records the ids embed generates (what tim_tokens would return)
        ids.update(generate_tim_tokens(*args, **kwargs))
        return dict(ids)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tim_module, "generate_tim_tokens", spy)
        got = rt.embed(x, merge_method=merge_method, layers="all", standardize=True, tim_temperature=0)
    assert list(ids) == list(rt.tim.modalities)
    for name, generated in ids.items():
        np.testing.assert_array_equal(generated.reshape(generated.shape[0], -1), ref_ids[KEYS[name]].numpy(),
                                      err_msg=f"{which}: generated {name} tokens differ")
    check_embedding(got, ref, f"{which} {'+'.join(names)} {merge_method}")


def test_separate_weights_export_the_generation_encoder_apart(separate):
    """After fine-tuning the two encoders differ (their graphs too); the chained TiM backbone's
    patch and token embeddings are one module upstream (frozen), so they stay one graph here."""
    _, rt = separate
    tim = json.loads((rt.manifest.directory / "manifest.json").read_text())["tim"]
    assert tim["generation_weights"] == "separate"
    assert tim["generation_graphs"] == {"encoder": "tim_encoder"}


def test_shared_weights_write_every_graph_once(shared):
    _, rt = shared
    assert rt.manifest.data["tim"]["generation_weights"] == "shared"
    assert rt.manifest.data["tim"]["generation_graphs"] == {}
    assert not [g for g in rt.manifest.graphs if g.startswith(("tim_", "tokenize_", "unet_", "detokenize_"))]
