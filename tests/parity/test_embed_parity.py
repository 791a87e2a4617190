"""Embedding parity with upstream terratorch: same randomised weights in terratorch, in our
reference and in the exported graphs run by the torch-free runtime."""
from __future__ import annotations

import numpy as np
import pytest

from .upstream import import_terratorch, randomize_state, rel_error, terramesh_tile

pytestmark = [pytest.mark.parity, pytest.mark.big_memory]  # official-size tokenizers or base weights
REGISTRY = import_terratorch()

import torch  # noqa: E402

from tm_export.export import ExportConfig, build_reference, export  # noqa: E402
from tm_runtime import TerraMindRuntime  # noqa: E402
from tm_runtime.modalities import get_modality  # noqa: E402

REF_TOL, RUNTIME_TOL = 1e-5, 1e-4
MERGES = ["mean", "max", "concat", "dict", None]
CASES = [("tiny", ("S2L2A",)), ("tiny", ("S2L2A", "S1GRD")), ("tiny", ("S1GRD", "DEM", "RGB")),
         ("base", ("S2L2A", "S1GRD"))]


def upstream(size: str, modalities, state: dict, merge_method, **kwargs):
    model = REGISTRY.build(f"terramind_v1_{size}", pretrained=False, modalities=list(modalities),
                           merge_method=merge_method, **kwargs).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"missing_mod_token"}, (missing, unexpected)
    if merge_method == "concat":
        with torch.no_grad():  # upstream leaves it uninitialised; ours is defined as zeros
            model.missing_mod_token.zero_()
    return model


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{'+'.join(c[1])}")
def case(request, tmp_path_factory):
    size, modalities = request.param
    source = REGISTRY.build(f"terramind_v1_{size}", pretrained=False, modalities=list(modalities)).eval()
    state = randomize_state(source, seed=hash(request.param) % 1000)
    ckpt = tmp_path_factory.mktemp("ckpt") / f"TerraMind_v1_{size}.pt"
    torch.save(state, ckpt)
    out = tmp_path_factory.mktemp("export") / size
    cfg = ExportConfig(size=size, modalities=list(modalities), out=out, ckpt=ckpt)
    export(cfg, log=lambda s: None)
    reference, _ = build_reference(cfg, log=lambda s: None)
    return {"size": size, "modalities": modalities, "state": state, "runtime": TerraMindRuntime(out),
            "reference": reference}


def inputs_for(modalities, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((batch, get_modality(m).num_channels, 224, 224)).astype(np.float32)
            for m in modalities}


def as_list(out) -> list:
    return out if isinstance(out, list) else [out]


def compare(upstream_out, ours, tol: float, what: str) -> None:
    for i, (u, o) in enumerate(zip(as_list(upstream_out), as_list(ours))):
        if isinstance(u, dict):
            assert list(u) == list(o), what
            for k in u:
                assert rel_error(o[k], u[k].numpy()) <= tol, f"{what} layer {i} {k}"
        else:
            assert o.shape == tuple(u.shape), f"{what} layer {i}: {o.shape} vs {tuple(u.shape)}"
            err = rel_error(o, u.numpy())
            assert err <= tol, f"{what} layer {i}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("merge_method", MERGES, ids=str)
def test_reference_and_runtime_match_terratorch(case, merge_method):
    model = upstream(case["size"], case["modalities"], case["state"], merge_method)
    x = inputs_for(case["modalities"])
    with torch.no_grad():
        up = model({k: torch.from_numpy(v) for k, v in x.items()})
        ref = [t.numpy() for t in case["reference"]({k: torch.from_numpy(v) for k, v in x.items()})]
    assert len(up) == len(ref)
    # (a) reference vs terratorch, every layer, before merging
    raw = upstream(case["size"], case["modalities"], case["state"], None)
    with torch.no_grad():
        up_raw = raw({k: torch.from_numpy(v) for k, v in x.items()})
    compare(up_raw, ref, REF_TOL, "reference")
    # (b) runtime vs terratorch, every layer, merged
    ours = case["runtime"].embed(x, merge_method=merge_method, layers="all")
    compare(up, ours, RUNTIME_TOL, f"runtime {merge_method}")


def test_missing_modalities_match_terratorch(case):
    if len(case["modalities"]) < 2:
        pytest.skip("needs two or more exported modalities")
    given = case["modalities"][::-1][:-1]  # a strict subset, in another order than exported
    x = inputs_for(given, batch=1, seed=3)
    for merge_method in ("mean", "concat", "dict"):
        model = upstream(case["size"], case["modalities"], case["state"], merge_method)
        with torch.no_grad():
            up = model({k: torch.from_numpy(v) for k, v in x.items()})
        compare(up[-1], case["runtime"].embed(x, merge_method=merge_method), RUNTIME_TOL, merge_method)


def test_real_tiles_with_standardization(case):
    if "S2L2A" not in case["modalities"]:
        pytest.skip("case has no S2L2A")
    raw = np.stack([terramesh_tile("S2L2A", i) for i in range(2)])
    spec = get_modality("S2L2A")
    mean = np.asarray(spec.mean, np.float32)[None, :, None, None]
    std = np.asarray(spec.std, np.float32)[None, :, None, None]
    model = upstream(case["size"], case["modalities"], case["state"], "mean")
    with torch.no_grad():
        up = model({"S2L2A": torch.from_numpy((raw - mean) / std)})
    compare(up[-1], case["runtime"].embed({"S2L2A": raw}, standardize=True), RUNTIME_TOL, "real tiles")


def test_band_subset_matches_terratorch(tmp_path):
    bands = ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]
    full = REGISTRY.build("terramind_v1_tiny", pretrained=False, modalities=["S2L2A"]).eval()
    state = randomize_state(full, seed=5)
    ckpt = tmp_path / "TerraMind_v1_tiny.pt"
    torch.save(state, ckpt)
    model = REGISTRY.build("terramind_v1_tiny", pretrained=False, modalities=["S2L2A"], bands={"S2L2A": bands},
                           ckpt_path=str(ckpt)).eval()
    torch.set_float32_matmul_precision("highest")
    cfg = ExportConfig(size="tiny", modalities=["S2L2A"], out=tmp_path / "out", ckpt=ckpt, bands={"S2L2A": bands})
    export(cfg, log=lambda s: None)
    x = np.random.default_rng(1).standard_normal((2, 6, 224, 224)).astype(np.float32)
    with torch.no_grad():
        up = model({"S2L2A": torch.from_numpy(x)})
        ref = build_reference(cfg, log=lambda s: None)[0]({"S2L2A": torch.from_numpy(x)})
    compare(up, [t.numpy() for t in ref], REF_TOL, "reference bands")
    compare(up, TerraMindRuntime(cfg.out).embed({"S2L2A": x}, layers="all"), RUNTIME_TOL, "runtime bands")


def test_tokenized_lulc_input_matches_terratorch(tmp_path):
    """LULC as an input (real LULC tokenizer configuration): class map -> tokenizer -> token embedding."""
    from tm_export import weights as W

    model = REGISTRY.build("terramind_v1_tiny", pretrained=False, modalities=["S2L2A", "LULC"],
                           merge_method="dict").eval()
    torch.set_float32_matmul_precision("highest")
    backbone_keys = [k for k in model.state_dict() if not k.startswith("tokenizer.")]
    state = randomize_state(model, seed=8)
    tok_state = W.random_state({k[len("tokenizer.tok_lulc@224."):]: v for k, v in state.items()
                                if k.startswith("tokenizer.tok_lulc@224.")}, seed=9, keep=())
    model.tokenizer["tok_lulc@224"].load_state_dict(tok_state, strict=True)
    torch.save({k: state[k] for k in backbone_keys}, tmp_path / "TerraMind_v1_tiny.pt")
    torch.save(tok_state, tmp_path / "TerraMind_Tokenizer_LULC.pt")
    cfg = ExportConfig(size="tiny", modalities=["S2L2A", "LULC"], out=tmp_path / "out",
                       ckpt=tmp_path / "TerraMind_v1_tiny.pt",
                       tokenizer_ckpts={"LULC": tmp_path / "TerraMind_Tokenizer_LULC.pt"})
    export(cfg, log=lambda s: None)
    classes = np.stack([terramesh_tile("LULC", i)[0] for i in range(2)]).astype(np.int64)
    s2 = np.random.default_rng(0).standard_normal((2, 12, 224, 224)).astype(np.float32)
    with torch.no_grad():
        up = model({"S2L2A": torch.from_numpy(s2), "LULC": torch.from_numpy(classes)})
    ours = TerraMindRuntime(cfg.out).embed({"S2L2A": s2, "LULC": classes}, merge_method="dict", layers="all")
    compare(up, ours, RUNTIME_TOL, "tokenized LULC")
