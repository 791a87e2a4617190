"""The TiM step of ``embed`` and the TiM export, on a small random model (no terratorch).

The model is a two-layer, 64-wide TerraMind registered for these tests only ("micro"): the TiM
logic does not depend on the size and the export takes seconds. Equality with terratorch's TiM
backbone is tests/tim/test_tim_parity.py's job; here each behaviour is checked against the
runtime's separately tested pieces (encoder, decoder logits, token embeddings).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tm_export.export import ExportConfig, export
from tm_export.reference.terramind import VARIANTS, Variant
from tm_export.tim import TimSettings, check_tim_inputs, checkpoint_states, split_tim_state
from tm_runtime import TerraMindRuntime
from tm_runtime.sampling import sample_tokens
from tm_runtime.tim import TimOptions, tim_tokens
from tm_runtime.trt.profiles import max_context_modalities

MICRO = Variant("micro", 64, 2, 2, 2, gated_mlp=False, bias=True)
GRID = 14


@pytest.fixture(scope="module")
def rt(tmp_path_factory) -> TerraMindRuntime:
    """Inputs S1GRD and LULC (tokenised), TiM modalities LULC then NDVI (chained)."""
    out = tmp_path_factory.mktemp("tim") / "micro"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(VARIANTS, "micro", MICRO)
        export(ExportConfig(size="micro", modalities=["S1GRD", "LULC"], out=out, random_init=True, seed=5,
                            tokenizer_size="small", simplify=False, validate=False,
                            tim=TimSettings(("LULC", "NDVI"))),
               log=lambda s: None)
    return TerraMindRuntime(out)


def s1(batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 2, 224, 224)).astype(np.float32)


def lulc_map(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 10, (batch, 224, 224))


def last_layer(rt, tokens: np.ndarray) -> np.ndarray:
    return rt.encode(tokens, [rt.num_layers - 1])[0]


def token_parts(rt, name: str, ids: np.ndarray):
    return rt.backend.run(f"embed_tok_{name}", {"ids": ids.astype(np.int64)}, ["tokens", "emb"])


# -- the export -----------------------------------------------------------------------------------
def test_manifest_tim_section_and_graphs(rt):
    data = json.loads((rt.manifest.directory / "manifest.json").read_text())
    assert data["tim"] == {"modalities": ["LULC", "NDVI"], "chained": True,
                           "defaults": {"temperature": 1.0, "top_p": 0.8, "top_k": 0, "decoding_steps": 1},
                           "generation_weights": "shared", "generation_graphs": {}}
    # decoders and token embeddings of the TiM modalities; LULC's tokenizer encoder only because
    # LULC is also an input; no tokenizer decoder at all (TiM needs tokens only); shared weights:
    # no generation-model graph of its own
    graphs = set(rt.manifest.graphs)
    assert {"embed_S1GRD", "embed_tok_LULC", "embed_tok_NDVI", "encoder", "tokenize_LULC"} <= graphs
    assert not [g for g in graphs if g.startswith(("unet_", "detokenize_", "tokenize_NDVI", "tim_"))]
    assert {t.name for t in rt.manifest.targets.values()} == {"LULC", "NDVI"}
    assert data["targets"]["NDVI"]["tim_only"] and data["targets"]["NDVI"]["tokenize_graph"] is None
    assert data["targets"]["LULC"]["tokenize_graph"] == "tokenize_LULC"
    assert rt.output_modalities == []


def test_tim_only_modalities_cannot_be_generated(rt):
    with pytest.raises(ValueError, match="NDVI was exported for the TiM step only"):
        rt.generate({"S1GRD": s1()}, ["NDVI"])
    with pytest.raises(ValueError, match="LULC was exported for the TiM step only"):
        rt.decode_tokens("LULC", np.zeros((1, GRID, GRID), np.int64))


def test_trt_profiles_count_tim_modalities(rt):
    assert max_context_modalities(rt.manifest) == 3  # S1GRD, LULC, NDVI


# -- the TiM step ---------------------------------------------------------------------------------
def test_argmax_is_deterministic_and_ignores_the_seed(rt):
    x = {"S1GRD": s1(batch=1)}
    a = rt.embed(x, tim_temperature=0, seed=1)
    np.testing.assert_array_equal(a, rt.embed(x, tim_temperature=0, seed=2))
    np.testing.assert_array_equal(a, rt.embed(x, tim_temperature=0))


def test_sampling_is_reproducible_with_a_seed(rt):
    """At upstream's defaults (temperature 1, top-p 0.8): the same seed, the same tokens and embedding."""
    x = {"S1GRD": s1(batch=1)}
    a, b = tim_tokens(rt, x, seed=3), tim_tokens(rt, x, seed=3)
    for name in ("LULC", "NDVI"):
        np.testing.assert_array_equal(a[name], b[name])
        assert a[name].shape == (1, GRID, GRID) and a[name].dtype == np.int64


def pieces(rt, image: np.ndarray, seed: int, chained: bool) -> dict[str, np.ndarray]:
    """The TiM step from the runtime's pieces: one Generator, B*h*w uniforms per modality in order
    (sampling.sample_tokens at temperature 1, no nucleus filter)."""
    rng = np.random.default_rng(seed)
    t0, e0 = rt.backend.run("embed_S1GRD", {"image": image}, ["tokens", "emb"])
    lulc = sample_tokens(rt.decoder_logits("LULC", last_layer(rt, t0), e0), rng).reshape(-1, GRID, GRID)
    t1, e1 = token_parts(rt, "LULC", lulc)
    ctx, emb = (np.concatenate([t0, t1], 1), np.concatenate([e0, e1], 1)) if chained else (t0, e0)
    ndvi = sample_tokens(rt.decoder_logits("NDVI", last_layer(rt, ctx), emb), rng).reshape(-1, GRID, GRID)
    return {"LULC": lulc, "NDVI": ndvi}


def test_chained_generation_matches_the_pieces(rt):
    """LULC from S1GRD; NDVI from S1GRD + the generated LULC; the encoder then reads all three."""
    x = {"S1GRD": s1()}
    expected = pieces(rt, x["S1GRD"], seed=5, chained=True)
    ids = tim_tokens(rt, x, tim_top_p=1.0, seed=5)
    for name in expected:
        np.testing.assert_array_equal(ids[name], expected[name])
    t = [rt.backend.run("embed_S1GRD", {"image": x["S1GRD"]}, ["tokens"])[0]]
    t += [token_parts(rt, name, expected[name])[0] for name in ("LULC", "NDVI")]
    np.testing.assert_allclose(rt.embed(x, merge_method=None, tim_top_p=1.0, seed=5),
                               last_layer(rt, np.concatenate(t, 1)), rtol=0, atol=1e-6)
    other = tim_tokens(rt, x, tim_top_p=1.0, seed=6)
    assert (other["LULC"] != ids["LULC"]).any(), "two seeds drew the same tokens at temperature 1"


def test_unchained_generation_sees_the_inputs_only(rt):
    unchained = TerraMindRuntime(rt.manifest.directory)
    unchained.tim = dataclasses.replace(unchained.tim, chained=False)
    x = {"S1GRD": s1(batch=1)}
    expected = pieces(rt, x["S1GRD"], seed=5, chained=False)
    got = tim_tokens(unchained, x, tim_top_p=1.0, seed=5)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    assert (pieces(rt, x["S1GRD"], seed=5, chained=True)["NDVI"] != expected["NDVI"]).any()


def test_tim_modality_given_as_input_is_not_generated(rt):
    x = {"S1GRD": s1(batch=1), "LULC": lulc_map(batch=1)}
    assert list(tim_tokens(rt, x, tim_temperature=0)) == ["NDVI"]
    arrays = rt.prepare(x)
    t0, e0 = rt.backend.run("embed_S1GRD", {"image": arrays["S1GRD"]}, ["tokens", "emb"])
    lulc_ids = rt.backend.run("tokenize_LULC", {"image": arrays["LULC"]}, ["ids"])[0]
    t1, e1 = token_parts(rt, "LULC", lulc_ids)
    ctx, emb = np.concatenate([t0, t1], 1), np.concatenate([e0, e1], 1)
    ndvi = rt.decoder_logits("NDVI", last_layer(rt, ctx), emb).argmax(-1).reshape(1, GRID, GRID)
    t2, _ = token_parts(rt, "NDVI", ndvi)
    got = rt.embed(x, merge_method=None, tim_temperature=0)
    assert got.shape == (1, 3 * GRID * GRID, 64)
    np.testing.assert_allclose(got, last_layer(rt, np.concatenate([t0, t1, t2], 1)), rtol=0, atol=1e-6)
    # every TiM modality given: no TiM step, the plain backbone
    only_lulc = {"LULC": lulc_map()}
    tim_rt = TerraMindRuntime(rt.manifest.directory)
    tim_rt.tim = dataclasses.replace(tim_rt.tim, modalities=("LULC",))
    assert tim_tokens(tim_rt, only_lulc) == {}


def test_merges_take_tim_tokens_as_upstream(rt):
    x = {"S1GRD": s1(batch=1)}
    raw = rt.embed(x, merge_method=None, tim_temperature=0)
    parts = np.split(raw, 3, axis=1)  # S1GRD, LULC, NDVI
    np.testing.assert_allclose(rt.embed(x, tim_temperature=0), np.mean(parts, axis=0), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(rt.embed(x, merge_method="max", tim_temperature=0), np.max(parts, axis=0))
    # 'dict' keeps the inputs only (upstream names its entries after the inputs)
    as_dict = rt.embed(x, merge_method="dict", tim_temperature=0)
    assert list(as_dict) == ["S1GRD"]
    np.testing.assert_array_equal(as_dict["S1GRD"], parts[0])
    # 'concat': inputs, then TiM modalities, then zeros for each image modality neither given nor generated
    np.testing.assert_array_equal(rt.embed(x, merge_method="concat", tim_temperature=0),
                                  np.concatenate(parts, axis=-1))
    only_lulc = rt.embed({"LULC": lulc_map(batch=1)}, merge_method="concat", tim_temperature=0)  # S1GRD missing
    assert only_lulc.shape == (1, GRID * GRID, 3 * 64) and not only_lulc[..., 128:].any()


def test_several_decoding_steps_extension(rt):
    """Upstream crashes for tim_decoding_steps > 1; ours decodes in ROAR passes, reproducibly."""
    x = {"S1GRD": s1(batch=1)}
    a = tim_tokens(rt, x, tim_decoding_steps=3, tim_top_p=1.0, seed=0)
    b = tim_tokens(rt, x, tim_decoding_steps=3, tim_top_p=1.0, seed=0)
    for name in ("LULC", "NDVI"):
        assert a[name].shape == (1, GRID, GRID)
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("kwargs, error, words", [
    ({"tim_temperature": -1.0}, ValueError, "tim_temperature"),
    ({"tim_top_p": 0.0}, ValueError, "top_p must be in"),
    ({"tim_top_k": -2}, ValueError, "top_k must be >= 0"),
    ({"tim_top_k": 0.5}, TypeError, "top_k must be an int"),
    ({"tim_decoding_steps": 0}, ValueError, "tim_decoding_steps must be an int >= 1"),
    ({"seed": "7"}, TypeError, "seed must be an int"),
    ({"seed": -1}, ValueError, "seed must be a non-negative int or None, got -1"),
])
def test_bad_tim_arguments(rt, kwargs, error, words):
    with pytest.raises(error, match=words):
        rt.embed({"S1GRD": s1(1)}, **kwargs)


def test_tim_arguments_need_a_tim_export(rt):
    with pytest.raises(ValueError, match="tim_top_p: this export has no TiM step"):
        TimOptions.resolve(None, top_p=0.5)
    assert TimOptions.resolve(None, seed=3) is None  # a seed alone is harmless: embed is deterministic
    unchained = dataclasses.replace(rt.tim, chained=False)
    with pytest.raises(ValueError, match="unchained"):
        TimOptions.resolve(unchained, decoding_steps=2)


# -- export-side rules ----------------------------------------------------------------------------
def test_tim_settings_rules():
    assert TimSettings(("lulc", "s1")).modalities == ("LULC", "S1GRD")
    with pytest.raises(ValueError, match="coords"):
        TimSettings(("coords",))
    with pytest.raises(ValueError, match="twice"):
        TimSettings(("LULC", "lulc"))
    with pytest.raises(ValueError, match="at least one"):
        TimSettings(())
    with pytest.raises(ValueError, match="raw input"):
        check_tim_inputs(TimSettings(("S1GRD",)), ["S1GRD", "S2L2A"], {})
    check_tim_inputs(TimSettings(("LULC",)), ["S1GRD", "LULC"], {})  # a tokenised input may be both
    with pytest.raises(ValueError, match="--bands"):
        check_tim_inputs(TimSettings(("LULC",)), ["S2L2A"], {"S2L2A": ["RED"]})


def test_settings_from_terratorch_arguments():
    s = TimSettings.from_backbone_kwargs({"backbone_tim_modalities": ["NDVI", "LULC"], "backbone_tim_temps": 0.5,
                                          "backbone_tim_top_p": 0.0, "backbone_tim_top_k": 5})
    assert (s.modalities, s.temperature, s.top_p, s.top_k, s.chained) == (("NDVI", "LULC"), 0.5, 1.0, 5, True)
    assert TimSettings.from_backbone_kwargs({}).modalities == ("LULC",)  # upstream's default
    with pytest.raises(ValueError, match="tim_top_k"):
        TimSettings.from_backbone_kwargs({"tim_top_k": 0.1})  # upstream's fraction of the vocabulary: not ours


def test_tim_backbone_state_split():
    import torch

    w = torch.zeros(1)
    state = {f"model.encoder.{k}": w for k in (
        "sampler.model.encoder.0.attn.qkv.weight", "sampler.model.decoder.0.mlp.fc1.weight",
        "sampler.model.decoder_embeddings.tok_lulc@224.token_emb.weight", "encoder.0.attn.qkv.weight",
        "encoder_norm.weight", "encoder_embeddings.untok_sen1grd@224.proj.weight", "tokenizer.tok_lulc@224.x")}
    state["model.head.weight"] = w
    generation, embedding = split_tim_state(state)
    assert sorted(generation) == ["decoder.0.mlp.fc1.weight", "decoder_embeddings.tok_lulc@224.token_emb.weight",
                                  "encoder.0.attn.qkv.weight"]
    assert sorted(embedding) == ["encoder.0.attn.qkv.weight", "encoder_embeddings.untok_sen1grd@224.proj.weight",
                                 "encoder_norm.weight"]
    merged, gen = checkpoint_states(state, TimSettings(("LULC",)), [], "fit.ckpt")
    assert gen.keys() == generation.keys()
    assert "decoder.0.mlp.fc1.weight" in merged and "tokenizer.tok_lulc@224.x" not in merged
    assert split_tim_state({"encoder.0.attn.qkv.weight": w}) is None
    with pytest.raises(ValueError, match="pass --tim-modalities"):
        checkpoint_states(state, None, [], "fit.ckpt")
    with pytest.raises(ValueError, match="--output-modalities"):
        checkpoint_states(state, TimSettings(("LULC",)), ["S2L2A"], "fit.ckpt")
