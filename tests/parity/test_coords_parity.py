"""Coords parity with upstream terratorch: the coords tokenizer (ids and text decoding) with the same
tokenizer file, the backbone with a coords input, the causal coords decoder, and argmax
generation with coords as input, as a chained first output (upstream's pending [S_1] encoder
token) and as the last output. Weights: one randomised superset model shared by every
upstream model and by our export; the LULC tokenizer has its real configuration."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from .upstream import import_terratorch, randomize_state, rel_error, terramesh_tile

pytestmark = [pytest.mark.parity, pytest.mark.big_memory]  # official-size tokenizers or base weights
REGISTRY = import_terratorch()
pytest.importorskip("tokenizers", reason="coords need the tokenizers package")

import torch  # noqa: E402
from terratorch.models.backbones.terramind.model.generate import (  # noqa: E402
    init_empty_target_modality,
    init_full_input_modality,
)
from terratorch.models.backbones.terramind.model.modality_info import MODALITY_INFO  # noqa: E402
from terratorch.models.backbones.terramind.tokenizer.text.text_tokenizer import CoordsTokenizer  # noqa: E402
from terratorch.registry import FULL_MODEL_REGISTRY  # noqa: E402

from tests.coords_vocab import write_coords_tokenizer  # noqa: E402
from tm_export import weights as W  # noqa: E402
from tm_export.export import ExportConfig, build_reference, export  # noqa: E402
from tm_runtime import TerraMindRuntime  # noqa: E402

from .test_generate_parity import standardized  # noqa: E402

REF_TOL, RUNTIME_TOL = 1e-5, 1e-4
LONLAT = np.array([[8.54, 47.37], [-3.1, 40.2]], dtype=np.float32)


def generator(inputs: list[str], outputs: list[str]):
    model = FULL_MODEL_REGISTRY.build("terramind_v1_tiny_generate", pretrained=False, modalities=inputs,
                                      output_modalities=outputs, timesteps=2, temps=0.0, standardize=True).eval()
    torch.set_float32_matmul_precision("highest")
    return model


def load(model, state: dict, lulc_state: dict, vocab) -> None:
    backbone = model.sampler.model
    own = backbone.state_dict()
    assert set(own) <= set(state), sorted(set(own) - set(state))
    backbone.load_state_dict({k: state[k] for k in own}, strict=True)
    if "tok_lulc@224" in model.tokenizer:
        model.tokenizer["tok_lulc@224"].load_state_dict(lulc_state, strict=True)
    model.tokenizer["coords"] = CoordsTokenizer(str(vocab))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("coords_parity")
    vocab = write_coords_tokenizer(root / "config.json")
    # Superset: coords and S2L2A in, LULC (chained, so it has an encoder embedding too) and coords out.
    superset = generator(["S2L2A", "coords"], ["LULC", "coords"])
    backbone = superset.sampler.model
    state = randomize_state(backbone, seed=31)
    for key in list(state):  # the checkpoint ties to_logits to token_emb
        if key.endswith("to_logits.weight"):
            state[key] = state[key.replace("to_logits", "token_emb")]
    backbone.load_state_dict(state, strict=True)
    state = dict(backbone.state_dict())  # shared mod_emb: read back what the tied parameters hold
    lulc_state = W.random_state(superset.tokenizer["tok_lulc@224"].state_dict(), seed=32, keep=())
    torch.save(state, root / "TerraMind_v1_tiny.pt")
    torch.save(lulc_state, root / "TerraMind_Tokenizer_LULC.pt")
    cfg = ExportConfig(size="tiny", modalities=["S2L2A", "coords"], output_modalities=["coords", "LULC"],
                       out=root / "export", ckpt=root / "TerraMind_v1_tiny.pt", validate=False, simplify=False,
                       tokenizer_ckpts={"LULC": root / "TerraMind_Tokenizer_LULC.pt", "coords": vocab})
    export(cfg, log=lambda s: None)
    reference, _ = build_reference(cfg, log=lambda s: None)
    return {"state": state, "lulc": lulc_state, "vocab": vocab, "runtime": TerraMindRuntime(cfg.out),
            "reference": reference}


def tiles(batch: int = 2) -> dict[str, np.ndarray]:
    return {"S2L2A": np.stack([terramesh_tile("S2L2A", i) for i in range(batch)])}


def test_tokenizer_ids_and_text_match_upstream(setup):
    upstream = CoordsTokenizer(str(setup["vocab"]))
    # grid ties (round half to even), negative zero, the poles and the antimeridian
    lonlat = np.array([[8.54, 47.37], [12.125, -0.1], [-180.0, 90.0], [179.9, -89.99], [0.125, 0.375]],
                      dtype=np.float32)
    ref = upstream.encode(torch.from_numpy(lonlat))["tensor"].numpy()
    got = setup["runtime"].tokenize("coords", lonlat)
    np.testing.assert_array_equal(got, ref)
    # decoding: valid spans, a span without lon, one with a sentinel first, padding
    ids = np.concatenate([ref[:, :2], np.array([[ref[0, 0], 0], [6, ref[0, 1]]]), np.zeros((1, 2), int)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = upstream.decode_text({"coords": {"tensor": torch.from_numpy(ids)}})
        got = setup["runtime"].decode_tokens("coords", ids)
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float64))
    assert np.isfinite(got[:5]).all() and np.isnan(got[5:]).all()


def test_embed_with_coords_input(setup):
    inputs = {"S2L2A": tiles()["S2L2A"], "coords": LONLAT}
    for merge in ("dict", None, "mean"):
        model = REGISTRY.build("terramind_v1_tiny", pretrained=False, modalities=["S2L2A", "coords"],
                               merge_method=merge).eval()
        torch.set_float32_matmul_precision("highest")
        missing, unexpected = model.load_state_dict(setup["state"], strict=False)
        assert not missing, missing
        model.tokenizer["coords"] = CoordsTokenizer(str(setup["vocab"]))
        with torch.no_grad():
            ref = model({"S2L2A": torch.from_numpy(inputs["S2L2A"]), "coords": torch.from_numpy(LONLAT)})[-1]
        got = setup["runtime"].embed(inputs, merge_method=merge)
        if merge == "dict":
            assert set(got) == set(ref) == {"S2L2A", "coords"}
            assert got["coords"].shape == tuple(ref["coords"].shape) == (2, 3, 192)
            for name in ref:
                assert rel_error(got[name], ref[name].numpy()) <= RUNTIME_TOL, name
        else:
            assert got.shape == tuple(ref.shape)
            assert rel_error(got, ref.numpy()) <= RUNTIME_TOL


def upstream_coords_logits(model, x_std: dict, lonlat: np.ndarray, ids: torch.Tensor) -> np.ndarray:
    """Upstream's causal decoder pass of autoregressive_step_batched, for given ids (B, L)."""
    batch, length = ids.shape
    sampler, tm = model.sampler, model.sampler.model
    mod_dict = {}
    for name, tensor in x_std.items():
        value = {"tensor": tensor, "input_mask": torch.zeros(batch, 196, dtype=torch.bool),
                 "target_mask": torch.ones(batch, 196, dtype=torch.bool),
                 "decoder_attention_mask": torch.zeros(batch, 196, dtype=torch.bool)}
        mod_dict["untok_sen2l2a@224"] = init_full_input_modality(value, MODALITY_INFO, "untok_sen2l2a@224", "cpu")
    coords = model.tokenizer["coords"].encode(torch.from_numpy(lonlat), "cpu")
    mod_dict["coords"] = init_full_input_modality(coords, MODALITY_INFO, "coords", "cpu")
    target = init_empty_target_modality(MODALITY_INFO, "coords", batch, 4, "cpu")
    with torch.no_grad():
        enc = {m: tm.encoder_embeddings[m](d) for m, d in mod_dict.items()}
        tokens, emb, mask, _ = sampler.forward_mask_encoder_generation(enc)
        context = tm.decoder_proj_context(tm.forward_encoder(tokens + emb, mask)) + emb
        dec = {"coords": tm.decoder_embeddings["coords"].forward_embed(target)}
        _, dec_emb, _, _, _ = sampler.forward_mask_decoder_autoregressive(dec, "coords")
        y = tm.decoder_embeddings["coords"].token_emb(ids) + dec_emb[:, :length]
        causal = torch.ones(length, length, dtype=torch.bool).triu(1).expand(batch, -1, -1)
        y = tm.forward_decoder(y, context, mask, causal)
        return tm.decoder_embeddings["coords"].forward_logits(y).numpy()


def test_coords_decoder_logits(setup):
    model = generator(["S2L2A", "coords"], ["coords"])
    load(model, setup["state"], setup["lulc"], setup["vocab"])
    x = tiles()
    ids = np.array([[5, 417, 1500], [5, 9, 29999]])
    for length in (1, 3):
        ref = upstream_coords_logits(model, standardized(x), LONLAT, torch.from_numpy(ids[:, :length]))
        got = setup["runtime"].coords_logits({**x, "coords": LONLAT}, ids[:, :length], standardize=True)
        assert got.shape == ref.shape == (2, length, 30000)
        assert rel_error(got, ref) <= RUNTIME_TOL
    # our torch reference on the same inputs (the runtime's context, in its token order)
    rt = setup["runtime"]
    arrays, coords, _ = rt._prepare_inputs({**x, "coords": LONLAT}, True, True)
    encoded, emb = rt.encode_context(arrays, coords)
    with torch.no_grad():
        ours = setup["reference"].coords_logits(torch.from_numpy(encoded), torch.from_numpy(emb),
                                                torch.from_numpy(ids)).numpy()
    assert rel_error(ours, ref) <= REF_TOL * 10  # the context came through the ONNX encoder


def captured_coords(model) -> tuple[list, list]:
    """Record the merged coords ids upstream decodes (its forward returns only the text result)
    and the logits of every autoregressive step (last position, (B, V))."""
    seen, logits = [], []
    tokenizer = model.tokenizer["coords"]
    decode = tokenizer.decode_text

    def recording(mod_dict, key="coords"):
        seen.append(mod_dict[key]["tensor"].clone())
        return decode(mod_dict, key)

    tokenizer.decode_text = recording
    tm = model.sampler.model
    forward_logits = tm.forward_logits

    def recording_logits(y, decoder_mod_dict, decoder_mod_mask, *args, **kwargs):
        out = forward_logits(y, decoder_mod_dict, decoder_mod_mask, *args, **kwargs)
        if "coords" in out:
            logits.append(out["coords"].reshape(y.shape[0], y.shape[1], -1)[:, -1].numpy().copy())
        return out

    tm.forward_logits = recording_logits
    return seen, logits


def runtime_coords_logits(runtime) -> list:
    """Record the last-position logits of every coords head call of the runtime (one per step)."""
    logits = []
    run = runtime.backend.run

    def recording(graph, feeds, outputs):
        out = run(graph, feeds, outputs)
        if graph == runtime.manifest.coords.head_graph:
            logits.append(out[0][:, -1].copy())
        return out

    runtime.backend.run = recording
    return logits


@pytest.mark.parametrize("inputs, outputs", [
    (["S2L2A"], ["coords", "LULC"]),  # chained: the pending [S_1] token, then coords conditions LULC
    (["S2L2A"], ["LULC", "coords"]),  # coords last: LULC conditions it
    (["S2L2A", "coords"], ["LULC"]),  # coords as an input
], ids=["coords-then-LULC", "LULC-then-coords", "coords-input"])
def test_generate_argmax(setup, inputs, outputs):
    model = generator(inputs, outputs)
    load(model, setup["state"], setup["lulc"], setup["vocab"])
    seen, ref_logits = captured_coords(model)
    runtime = TerraMindRuntime(setup["runtime"].manifest.directory, verify=False)
    got_logits = runtime_coords_logits(runtime)
    x = tiles()
    if "coords" in inputs:
        x["coords"] = LONLAT
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        ref = model({k: torch.from_numpy(v) for k, v in x.items()}, timesteps=2)
        images, tokens = runtime.generate(x, outputs, temperature=0.0, timesteps=2, return_tokens=True)
    assert set(images) == set(ref) == set(outputs)
    if "coords" in outputs:
        # every autoregressive step's logits (this is what sees upstream's pending [S_1] token)
        assert len(got_logits) == len(ref_logits) >= 1
        for step, (got, expected) in enumerate(zip(got_logits, ref_logits)):
            assert rel_error(got, expected) <= RUNTIME_TOL, step
        np.testing.assert_array_equal(tokens["coords"], seen[0].numpy())
        np.testing.assert_array_equal(images["coords"], np.array(ref["coords"], dtype=np.float64))
    assert rel_error(images["LULC"], ref["LULC"].numpy()) <= RUNTIME_TOL
