"""Weights: local .pt / .safetensors, the HF cache layout offline, and errors that name the key."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tm_export import weights as W
from tm_export.export import ExportConfig, build_reference, export
from tm_runtime import TerraMindRuntime

QUIET = {"log": lambda s: None}


def full_checkpoint(seed: int = 11) -> dict[str, torch.Tensor]:
    """A checkpoint-like state_dict: more modalities than exported, plus decoder-side keys."""
    model, _ = build_reference(ExportConfig(size="tiny", modalities=["S2L2A", "S1GRD", "DEM"], out="unused",
                                            random_init=True, seed=seed), **QUIET)
    state = dict(model.state_dict())
    state["decoder_proj_context.weight"] = torch.zeros(192, 192)  # not needed by an embedding export
    state["mask_token"] = torch.zeros(1, 1, 192)
    return state


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "TerraMind_v1_tiny.pt"
    torch.save(full_checkpoint(), path)
    return path


def test_pt_and_safetensors_give_the_same_export(ckpt, tmp_path):
    from safetensors.torch import save_file

    st = tmp_path / "w.safetensors"
    save_file(full_checkpoint(), str(st))
    outs = []
    for path in (ckpt, st):
        out = tmp_path / path.suffix.strip(".")
        manifest = export(ExportConfig(size="tiny", modalities=["S1GRD"], out=out, ckpt=path), **QUIET)
        assert manifest["weights"]["random_init"] is False and manifest["weights"]["source"] == "file"
        assert len(manifest["weights"]["sha256"]) == 64
        outs.append(TerraMindRuntime(out).embed({"S1GRD": np.ones((1, 2, 224, 224), np.float32)}))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_missing_key_is_named(tmp_path):
    state = full_checkpoint()
    del state["encoder.3.mlp.fc2.weight"]
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    with pytest.raises(W.WeightsError, match=r"lacks 1 key\(s\).*encoder\.3\.mlp\.fc2\.weight"):
        export(ExportConfig(size="tiny", modalities=["DEM"], out=tmp_path / "x", ckpt=path), **QUIET)
    assert not (tmp_path / "x").exists()


def test_shape_mismatch_is_named(ckpt, tmp_path):
    with pytest.raises(W.WeightsError, match=r"encoder_embeddings\.untok_dem@224\.mod_emb has shape \(1, 1, 192\)"
                                              r".*expects \(1, 1, 768\)"):
        export(ExportConfig(size="base", modalities=["DEM"], out=tmp_path / "x", ckpt=ckpt), **QUIET)


def test_missing_modality_in_checkpoint(ckpt, tmp_path):
    with pytest.raises(W.WeightsError, match="untok_sen2l1c@224.proj.weight"):
        export(ExportConfig(size="tiny", modalities=["S2L1C"], out=tmp_path / "x", ckpt=ckpt), **QUIET)


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("hello")
    with pytest.raises(W.WeightsError, match="could not read"):
        W.read_state_dict(bad)
    with pytest.raises(W.WeightsError, match="does not exist"):
        W.read_state_dict(tmp_path / "nope.pt")


def make_hf_cache(root, repo_id: str, filename: str, source) -> None:
    """The layout huggingface_hub keeps on disk: blobs, a snapshot per commit, refs/main."""
    repo_dir = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    blob = repo_dir / "blobs" / "deadbeef"
    blob.parent.mkdir()
    blob.write_bytes(source.read_bytes())
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / filename).symlink_to(blob)


def test_hub_cache_offline(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    make_hf_cache(cache, "ibm-esa-geospatial/TerraMind-1.0-tiny", "TerraMind_v1_tiny.pt", ckpt)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    assert W.hub_checkpoint("tiny").resolve() == (cache / "models--ibm-esa-geospatial--TerraMind-1.0-tiny" /
                                                   "blobs" / "deadbeef").resolve()
    manifest = export(ExportConfig(size="tiny", modalities=["DEM"], out=tmp_path / "hub_export"), **QUIET)
    assert manifest["weights"]["source"] == "huggingface_hub"
    assert manifest["weights"]["repo_id"] == "ibm-esa-geospatial/TerraMind-1.0-tiny"
    # the small model is not cached: one clear error saying what to do
    with pytest.raises(W.WeightsError, match=r"TerraMind_v1_small\.pt.*offline.*--ckpt"):
        W.hub_checkpoint("small")
