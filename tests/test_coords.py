"""Coords as an input and an output: the host-side pieces (text, merging, the autoregressive loop,
row groups), the exported graphs against the torch reference, generation draw for draw, and the
errors. A synthetic coords tokenizer file stands in for the hub's (tests/coords_vocab.py)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tokenizers", reason="coords need the tokenizers package (pip install '.[coords]')")

import torch  # noqa: E402

from tm_export.export import ExportConfig, ExportError, build_reference, build_tokenizers, export  # noqa: E402
from tm_export.reference.generation import reference_generate  # noqa: E402
from tm_runtime import TerraMindRuntime  # noqa: E402
from tm_runtime.context import EncoderContext, per_group  # noqa: E402
from tm_runtime.coords import (CoordsTokenizer, autoregressive_decode, causal_bias, check_coords, coords_text,  # noqa: E402
                              merge_span)
from tm_runtime.manifest import ManifestError  # noqa: E402

from .conftest import random_inputs  # noqa: E402
from .coords_vocab import write_coords_tokenizer  # noqa: E402

LONLAT = np.array([[8.54, 47.37], [-3.1, 40.2]])


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> Path:
    return write_coords_tokenizer(tmp_path_factory.mktemp("vocab") / "config.json")


def config(out: Path, vocab: Path, **kw) -> ExportConfig:
    base = dict(size="tiny", modalities=["S2L2A", "coords"], output_modalities=["coords", "LULC"], out=out,
                random_init=True, seed=3, tokenizer_size="small", tokenizer_ckpts={"coords": vocab})
    return ExportConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def coords_export(tmp_path_factory, vocab) -> Path:
    out = tmp_path_factory.mktemp("coords") / "tiny"
    export(config(out, vocab), log=lambda s: None)
    return out


@pytest.fixture(scope="module")
def runtime(coords_export):
    return TerraMindRuntime(coords_export)


@pytest.fixture(scope="module")
def reference(coords_export, vocab):
    cfg = config(coords_export, vocab)
    model, _ = build_reference(cfg, log=lambda s: None)
    tokenizers, _ = build_tokenizers(cfg, list(model.targets), log=lambda s: None)
    return model, tokenizers, CoordsTokenizer(vocab)


# -- host side ---------------------------------------------------------------------------------
def test_text_snaps_to_the_grid_like_upstream():
    # 0.125 * 4 = 0.5 rounds half to even (to 0); -0.1 snaps to -0.0, which upstream writes "-0.00"
    assert coords_text(np.array([[0.125, -0.1], [8.54, 47.37]])) == [
        "lat=-0.00 lon=0.00 [EOS]", "lat=47.25 lon=8.50 [EOS]"]


@pytest.mark.parametrize("value, pattern", [
    (np.zeros((2, 3)), r"shape \(batch, 2\)"), (np.zeros(2), r"shape \(batch, 2\)"),
    (np.array([[0.0, np.nan]]), "NaN"), (np.array([[47.0, 190.0]]), "swapped"),
    (np.array([["a", "b"]]), "dtype"), ([[1.0, 2.0]], "numpy"),
])
def test_check_coords_errors(value, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        check_coords(value)


def test_merge_span_follows_the_sentinels():
    sentinels = {4, 5, 6}
    assert merge_span([5, 10, 11, 12], 5, sentinels) == [10, 11, 12]
    assert merge_span([5, 10, 6, 12], 5, sentinels) == [10]
    assert merge_span([5, 6, 10, 11], 5, sentinels) == []
    assert merge_span([5, 10, 4, 11, 5, 12], 5, sentinels) == [10, 12]  # back in the [S_1] span


def test_tokenizer_round_trip_and_bad_files(vocab, tmp_path):
    tok = CoordsTokenizer(vocab)
    ids = tok.encode(LONLAT)
    assert ids.shape == (2, 3) and (ids[:, 2] == 3).all()
    np.testing.assert_array_equal(tok.decode(ids), [[8.5, 47.25], [-3.0, 40.25]])
    merged, lengths = tok.merge(np.array([[5, ids[0, 0], ids[0, 1], 6], [5, 6, 7, 8]]))
    assert lengths == [2, 0] and merged.shape == (2, 2) and (merged[1] == tok.pad_id).all()
    with pytest.warns(UserWarning, match="row 1 did not decode"):
        decoded = tok.decode(merged)
    assert np.isfinite(decoded[0]).all() and np.isnan(decoded[1]).all()
    with pytest.raises(ValueError, match="different lengths"):
        write_coords_tokenizer(tmp_path / "coarse.json", step=1.0)
        CoordsTokenizer(tmp_path / "coarse.json").encode(LONLAT)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizers file"):
        CoordsTokenizer(tmp_path / "junk.json")
    data = json.loads(Path(vocab).read_text())
    for entry in data["added_tokens"]:
        if entry["content"] == "[S_1]":
            entry["content"] = "[S_X]"
    data["model"]["vocab"]["[S_X]"] = data["model"]["vocab"].pop("[S_1]")
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"\[S_1\] -> 5"):
        CoordsTokenizer(tmp_path / "other.json")


def test_autoregressive_loop_stops_when_every_row_has_ended():
    calls = []

    def logits_fn(ids):
        calls.append(ids.copy())
        logits = np.zeros((ids.shape[0], ids.shape[1], 10), np.float32)
        logits[0, -1, 6] = 1.0  # row 0 ends at once
        logits[1, -1, 7 if ids.shape[1] < 2 else 6] = 1.0  # row 1 writes one token, then ends
        return logits

    out = autoregressive_decode(logits_fn, 2, np.random.default_rng(0), temperature=0.0)
    np.testing.assert_array_equal(out, [[5, 6, 6], [5, 7, 6]])
    assert [c.shape[1] for c in calls] == [1, 2]
    full = autoregressive_decode(lambda ids: np.ones((2, ids.shape[1], 10), np.float32) * np.arange(10) / 10,
                                 2, np.random.default_rng(0), temperature=0.0)
    assert full.shape == (2, 4) and (full[:, 1:] == 9).all()  # never ends: three tokens


def test_encoder_context_groups_rows_of_equal_length():
    ctx = EncoderContext(3)
    ctx.append(np.arange(3 * 2 * 1, dtype=np.float32).reshape(3, 2, 1), np.zeros((1, 2, 1), np.float32))
    ctx.append(np.ones((3, 1, 1), np.float32), np.ones((1, 1, 1), np.float32))
    ctx.replace_part(1, np.full((3, 2, 1), 7.0, np.float32), np.full((1, 2, 1), 2.0, np.float32), [2, 0, 2])
    groups = list(ctx.groups())
    assert [g[0].tolist() for g in groups] == [[0, 2], [1]]
    assert groups[0][1].shape == (2, 4, 1) and groups[1][1].shape == (1, 2, 1)
    np.testing.assert_array_equal(groups[0][2][0, :, 0], [0, 0, 2, 2])
    sums = per_group(groups, 3, lambda rows, tokens, emb: tokens.sum(axis=(1, 2)))
    np.testing.assert_array_equal(sums, [0 + 1 + 14, 2 + 3, 4 + 5 + 14])


# -- graphs against the reference --------------------------------------------------------------
def coords_decoder_logits(runtime, enc, emb, ids):
    """query_coords -> the shared decoder (causal bias) -> head_coords, graph by graph."""
    run = runtime.backend.run
    queries = run("decoder_query_coords", {"ids": ids}, ["queries"])[0]
    hidden = run("decoder", {"encoder_output": enc, "context_emb": emb, "queries": queries,
                             "self_bias": causal_bias(ids.shape[1])}, ["hidden"])[0]
    return run("decoder_head_coords", {"hidden": hidden}, ["logits"])[0]


def test_decoder_graphs_are_causal_at_every_length(runtime, reference):
    model = reference[0]
    rng = np.random.default_rng(0)
    enc = rng.standard_normal((2, 199, 192)).astype(np.float32)
    emb = rng.standard_normal((1, 199, 192)).astype(np.float32)
    ids = rng.integers(0, 30000, (2, 3))
    for length in (1, 2, 3):
        got = coords_decoder_logits(runtime, enc, emb, ids[:, :length])
        with torch.no_grad():
            ref = model.coords_logits(torch.from_numpy(enc), torch.from_numpy(emb),
                                      torch.from_numpy(ids[:, :length])).numpy()
        assert got.shape == (2, length, 30000)
        assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-4
        # position 0 sees only itself: the same whatever follows
        np.testing.assert_allclose(got[:, 0], ref[:, 0], rtol=0, atol=1e-4 * np.abs(ref).max())
    changed = ids.copy()
    changed[:, 2] = (changed[:, 2] + 1) % 30000
    after = coords_decoder_logits(runtime, enc, emb, changed)
    np.testing.assert_array_equal(after[:, :2], got[:, :2])
    assert not np.array_equal(after[:, 2], got[:, 2])


def test_embed_with_coords(runtime):
    x = random_inputs(2, 0, ["S2L2A"])
    d = runtime.embed({"coords": LONLAT, **x}, merge_method="dict")
    assert list(d) == ["coords", "S2L2A"] and d["coords"].shape == (2, 3, 192)
    np.testing.assert_array_equal(runtime.embed({"coords": LONLAT, **x}, merge_method="mean"), d["S2L2A"])
    raw = runtime.embed({"coords": LONLAT, **x}, merge_method=None)
    assert raw.shape == (2, 199, 192)
    # coords takes part in attention
    assert np.abs(runtime.embed(x, merge_method="mean") - d["S2L2A"]).max() > 1e-3
    only = runtime.embed({"location": LONLAT}, merge_method="dict")
    assert list(only) == ["coords"]
    with pytest.raises(ValueError, match="only sequence inputs"):
        runtime.embed({"coords": LONLAT}, merge_method="mean")


# -- generation --------------------------------------------------------------------------------
@pytest.mark.parametrize("inputs, outputs, temperature", [
    (["S2L2A"], ["coords", "LULC"], 1.0), (["S2L2A"], ["LULC", "coords"], 0.7),
    (["S2L2A", "coords"], ["LULC"], 1.0), (["coords"], ["LULC"], 0.0),
])
def test_generate_matches_reference_draw_for_draw(runtime, reference, inputs, outputs, temperature):
    model, tokenizers, coords_tok = reference
    x = {**random_inputs(2, 1, [m for m in inputs if m != "coords"]), **({"coords": LONLAT} if "coords" in inputs else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: generated coords do not spell coordinates
        images, tokens = runtime.generate(x, outputs, seed=5, temperature=temperature, return_tokens=True,
                                          standardize=False)
        ref_images, ref_tokens = reference_generate(model, tokenizers, x, outputs, np.random.default_rng(5),
                                                    temperature=temperature, standardize=False,
                                                    coords_tokenizer=coords_tok)
    for name in outputs:
        np.testing.assert_array_equal(tokens[name], ref_tokens[name])
    if "coords" in outputs:
        assert images["coords"].shape == (2, 2) and tokens["coords"].shape[0] == 2
        np.testing.assert_array_equal(images["coords"], ref_images["coords"])
    assert np.abs(images["LULC"] - ref_images["LULC"]).max() / np.abs(ref_images["LULC"]).max() < 1e-4


def test_rows_of_different_lengths(runtime, reference, monkeypatch):
    """Row 0 ends its coords after one token: the rows' encoder inputs differ in length from then
    on, and the runtime's row groups must give what the per-row reference gives."""
    merge = CoordsTokenizer.merge

    def uneven(self, generated):
        ids, lengths = merge(self, generated)
        ids[0, 1:] = self.pad_id
        return ids, [min(lengths[0], 1)] + lengths[1:]

    monkeypatch.setattr(CoordsTokenizer, "merge", uneven)
    model, tokenizers, coords_tok = reference
    x = random_inputs(2, 2, ["S2L2A"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images, tokens = runtime.generate(x, ["coords", "LULC"], seed=1, return_tokens=True)
        ref_images, ref_tokens = reference_generate(model, tokenizers, x, ["coords", "LULC"],
                                                    np.random.default_rng(1), coords_tokenizer=coords_tok)
    assert (tokens["coords"][0, 1:] == coords_tok.pad_id).all()
    for name in ("coords", "LULC"):
        np.testing.assert_array_equal(tokens[name], ref_tokens[name])
    assert np.abs(images["LULC"] - ref_images["LULC"]).max() / np.abs(ref_images["LULC"]).max() < 1e-4


def test_coords_building_blocks(runtime):
    ids = runtime.tokenize("coords", LONLAT)
    np.testing.assert_array_equal(runtime.decode_tokens("coords", ids), [[8.5, 47.25], [-3.0, 40.25]])
    logits = runtime.coords_logits(random_inputs(2, 0, ["S2L2A"]), np.array([[5, 7], [5, 8]]))
    assert logits.shape == (2, 2, 30000)
    assert runtime.modalities == ["S2L2A", "coords"] and runtime.output_modalities == ["LULC", "coords"]


@pytest.mark.parametrize("call, pattern", [
    (lambda rt, x: rt.generate({**x, "coords": LONLAT}, ["coords"]), "both an input and an output"),
    (lambda rt, x: rt.generate(x, ["coords"], noise={"coords": np.zeros(1)}), "noise given for coords"),
    (lambda rt, x: rt.generate({**x, "coords": LONLAT[:1]}, ["LULC"]), "same batch size"),
    (lambda rt, x: rt.generate({**x, "coords": np.array([[10.0, 100.0], [0.0, 0.0]])}, ["LULC"]), "swapped"),
    (lambda rt, x: rt.logits(x, "coords"), "token by token"),
    (lambda rt, x: rt.coords_logits(x, np.array([[5, 1, 2, 3]] * 2)), "1 <= L <= 3"),
    (lambda rt, x: rt.coords_logits(x, np.array([[5, 30000]] * 2)), r"\[0, 30000\)"),
    (lambda rt, x: rt.generate({**x, "coords": LONLAT, "location": LONLAT}, ["LULC"]), "given twice"),
])
def test_bad_coords_usage(runtime, call, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        call(runtime, random_inputs(2, 0, ["S2L2A"]))


def test_export_without_coords_rejects_them(small_generate_export):
    rt = TerraMindRuntime(small_generate_export)
    x = random_inputs(1, 0, ["S2L2A"])
    with pytest.raises(ValueError, match="coords was not exported as an input"):
        rt.embed({**x, "coords": LONLAT[:1]})
    with pytest.raises(ValueError, match="re-export with --output-modalities coords"):
        rt.generate(x, ["coords"])


def test_tokenizer_file_is_checked_and_required(coords_export, vocab, tmp_path, monkeypatch):
    manifest = json.loads((coords_export / "manifest.json").read_text())
    assert manifest["files"]["coords_tokenizer"]["file"] == "coords_tokenizer.json"
    assert manifest["coords"]["query_graph"] == "decoder_query_coords" and manifest["coords"]["input"]
    assert manifest["coords"]["head_graph"] == "decoder_head_coords" and manifest["decoder"]["graph"] == "decoder"
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in coords_export.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "coords_tokenizer.json").write_text((copy / "coords_tokenizer.json").read_text() + " ")
    with pytest.raises(ManifestError, match="coords_tokenizer"):
        TerraMindRuntime(copy).tokenize("coords", LONLAT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(Exception, match="--tokenizer-ckpt coords=PATH"):
        export(config(tmp_path / "out", vocab, tokenizer_ckpts={}, output_modalities=["coords"]), log=lambda s: None)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ExportError, match="not a Hugging Face tokenizers file"):
        export(config(tmp_path / "out", vocab, tokenizer_ckpts={"coords": tmp_path / "junk.json"},
                      output_modalities=["coords"]), log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_tensorrt_profiles_cover_coords(runtime):
    from tm_runtime.trt.profiles import graph_profiles

    profiles = graph_profiles(runtime.manifest)
    assert profiles["decoder_query_coords"].inputs["ids"] == ((1, 1), (1, 3), (4, 3))
    assert profiles["decoder_head_coords"].inputs["hidden"] == ((1, 1, 192), (1, 3, 192), (4, 3, 192))
    # the shared decoder takes the coords sequence (1 to 3 queries) and LULC's 196 alike
    assert profiles["decoder"].inputs["queries"] == ((1, 1, 192), (1, 196, 192), (4, 196, 192))
    assert profiles["decoder"].inputs["self_bias"] == ((1, 1), (196, 196), (196, 196))
    assert profiles["embed_coords"].inputs["ids"] == ((1, 1), (1, 3), (4, 3))
    # S2L2A, then LULC fed back before a last coords output: two image modalities, plus 3 coords tokens
    lo, _, hi = profiles["encoder"].inputs["tokens"]
    assert lo == (1, 1, 192) and hi == (4, 2 * 196 + 3, 192)


def test_coords_tokenizer_from_the_hub_cache(vocab, tmp_path, monkeypatch):
    """Without --tokenizer-ckpt coords=PATH the file comes from the HF hub (here: a local cache,
    offline), as config.json of ibm-esa-geospatial/TerraMind-1.0-Tokenizer-Coords."""
    import huggingface_hub.constants as C

    from .test_weights import make_hf_cache

    cache = tmp_path / "hub"
    make_hf_cache(cache, "ibm-esa-geospatial/TerraMind-1.0-Tokenizer-Coords", "config.json", Path(vocab))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    manifest = export(config(tmp_path / "out", vocab, tokenizer_ckpts={}, modalities=["S2L2A", "coords"],
                             output_modalities=[], validate=False), log=lambda s: None)
    info = manifest["weights"]["tokenizers"]["coords"]
    assert info["source"] == "huggingface_hub" and info["repo_id"] == "ibm-esa-geospatial/TerraMind-1.0-Tokenizer-Coords"
    assert (tmp_path / "out" / "coords_tokenizer.json").read_bytes() == Path(vocab).read_bytes()
    rt = TerraMindRuntime(tmp_path / "out")
    assert rt.embed({"coords": LONLAT}, merge_method="dict")["coords"].shape == (2, 3, 192)
