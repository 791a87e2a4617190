"""Fine-tuned Thinking-in-Modalities task models: the official TiM sen1floods11 config
(terramind_v1_base_tim_lulc_sen1floods11.yaml) on a tiny TiM backbone, every parameter random
(the frozen TiM enc-dec, the fine-tuned encoder, the neck's learned upsampling, decoder, head),
the checkpoint written by a Lightning Trainer as ``terratorch fit`` writes it, and ``predict``
compared with terratorch's task model at TiM temperature 0 (argmax on both sides).

Randomising every tensor independently is what fine-tuning does to a TiM backbone: the frozen
generation encoder (``sampler.model.encoder``) and the fine-tuned encoder end up different, while
the chained TiM backbone's patch and token embeddings are one module upstream (frozen with the
enc-dec), so they stay one graph.

Test-only patch of upstream, as in tests/tim: the TiM backbone would build the official LULC
tokenizer (184 M parameters, which the TiM step never runs on raw inputs); a small stand-in
module takes its place, so the checkpoint still holds ``model.encoder.tokenizer.*`` keys.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.parity.upstream import rel_error, terramesh_tile

from .terratorch_side import build_task, load_config, randomize_all, save_like_fit, standardize_like_datamodule, \
    write_config

pytestmark = pytest.mark.parity
MAX_REL = 1e-4
CONFIG = "tim_lulc_sen1floods11_base"  # the official TiM config, backbone swapped for the tiny one
LULC_KEY = "tok_lulc@224"


@dataclass
class TimCase:
    config: dict
    config_path: Path
    ckpt: Path
    export: Path
    task: object


def make_tim_case(tmp_path_factory, config: dict, name: str, seed: int) -> TimCase:
    import torch
    from terratorch.models.backbones.terramind.model import terramind_tim

    from tm_export.cli import main

    folder = tmp_path_factory.mktemp(name)
    path = write_config(config, folder / "config.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(terramind_tim, "build_tokenizer",
                   lambda *args, **kwargs: torch.nn.ModuleDict({LULC_KEY: torch.nn.Linear(4, 4)}))
        task = build_task(config)
    randomize_all(task.model, seed)
    task.eval()
    ckpt = save_like_fit(task, folder / "last.ckpt")
    # predict is compared with terratorch end to end below: no per-graph validation, no simplifier
    # (the tiny sen1floods11 case runs both on the same head and encoder graphs).
    argv = ["--task-config", str(path), "--ckpt", str(ckpt), "--out", str(folder / "export"), "--no-validate",
            "--no-simplify"]
    assert main(argv) == 0
    return TimCase(config, path, ckpt, folder / "export", task)


@pytest.fixture(scope="module")
def tim_case(tmp_path_factory) -> TimCase:
    return make_tim_case(tmp_path_factory, load_config(CONFIG, "terramind_v1_tiny_tim"), "task_tim", seed=41)


def raw_inputs(batch: int = 2) -> dict[str, np.ndarray]:
    """Real TerraMesh tiles: S2L1C counts, and S1RTC backscatter (dB) standing in for S1GRD."""
    return {"S2L1C": np.stack([terramesh_tile("S2L1C", i) for i in range(batch)]),
            "S1GRD": np.stack([terramesh_tile("S1RTC", i) for i in range(batch)])}


def run_terratorch(case: TimCase, raw: dict[str, np.ndarray]) -> tuple[np.ndarray, list, np.ndarray]:
    """terratorch's logits at TiM temperature 0, its backbone's layer outputs and the LULC ids its
    TiM step generated."""
    import torch

    backbone = case.task.model.encoder
    backbone.tim_temps = 0.0  # read at forward time
    captured, layers = {}, []
    generate = backbone.sampler.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        captured["ids"] = out[LULC_KEY]["tensor"].clone()
        return out

    hook = backbone.register_forward_hook(lambda module, args, out: layers.extend(o.clone() for o in out))
    inputs = standardize_like_datamodule(case.config, raw)
    try:
        with pytest.MonkeyPatch.context() as mp, torch.no_grad():
            mp.setattr(backbone.sampler, "generate", spy)
            logits = case.task(inputs).output.numpy()
    finally:
        hook.remove()
    return logits, [t.numpy() for t in layers], captured["ids"].numpy()


def test_tim_export_keeps_the_generation_encoder_apart(tim_case):
    from tm_runtime import TerraMindRuntime

    rt = TerraMindRuntime(tim_case.export)
    assert rt.task.type == "segmentation" and rt.task.modalities == ("S2L1C", "S1GRD")
    assert rt.task.encoder_graph == "encoder"  # the fine-tuned one
    tim = rt.manifest.data["tim"]
    assert rt.task.tim == tim and tim["modalities"] == ["LULC"] and tim["generation_weights"] == "separate"
    # Fine-tuned encoder and frozen generation encoder differ; the (frozen, shared) embeddings do not.
    assert tim["generation_graphs"] == {"encoder": "tim_encoder"}
    assert {"encoder", "tim_encoder", "decoder", "embed_tok_LULC", "head"} <= set(rt.manifest.graphs)
    # The config sets no backbone_tim_*: upstream's defaults.
    assert tim["defaults"] == {"temperature": 1.0, "top_p": 0.8, "top_k": 0, "decoding_steps": 1}


def test_tim_predict_matches_terratorch(tim_case):
    from tm_runtime import TerraMindRuntime
    from tm_runtime import tim as tim_module

    raw = raw_inputs()
    ref, ref_layers, ref_ids = run_terratorch(tim_case, raw)
    rt = TerraMindRuntime(tim_case.export)
    generated = []

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        generated.append(out)
        return out

    generate = tim_module.generate_tim_tokens
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tim_module, "generate_tim_tokens", spy)
        logits = rt.predict(raw, tim_temperature=0.0)
    (ids,) = generated
    np.testing.assert_array_equal(ids["LULC"].reshape(2, -1), ref_ids, err_msg="generated LULC tokens differ")
    assert logits.shape == ref.shape == (2, 2, 224, 224) and logits.dtype == np.float32
    err = rel_error(logits, ref)
    assert err <= MAX_REL, f"logits: relative error {err:.2e}"
    # embed on the fine-tuned export runs the same TiM backbone (mean merge, every layer).
    standardized = {k: v.numpy() for k, v in standardize_like_datamodule(tim_case.config, raw).items()}
    layers = rt.embed(standardized, layers="all", tim_temperature=0.0)
    for i, (got, want) in enumerate(zip(layers, ref_layers, strict=True)):
        err = rel_error(got, want)
        assert err <= MAX_REL, f"embed layer {i}: relative error {err:.2e}"


def test_tim_predict_is_seeded(tim_case):
    """Upstream draws a fresh seed on every forward; ours repeats for a given seed."""
    from tm_runtime import TerraMindRuntime

    raw = raw_inputs(batch=1)
    rt = TerraMindRuntime(tim_case.export)
    first = rt.predict(raw, seed=7)
    np.testing.assert_array_equal(first, rt.predict(raw, seed=7))
    assert not np.array_equal(first, rt.predict(raw, seed=8, tim_top_p=1.0))
    # top-k 1 leaves one token to draw: whatever the seed and temperature, that is temperature 0's argmax
    np.testing.assert_array_equal(rt.predict(raw, seed=3, tim_top_k=1, tim_top_p=1.0),
                                  rt.predict(raw, tim_temperature=0.0))
    with pytest.raises(ValueError, match="tim_temperature"):
        rt.predict(raw, tim_temperature=-1.0)
    with pytest.raises(ValueError, match="tim_decoding_steps"):
        rt.predict(raw, tim_decoding_steps=0)


def test_tim_checkpoint_config_mismatch_names_the_key(tim_case, tmp_path):
    import torch

    from tm_export.task.config import TaskConfigError
    from tm_export.task.export import TaskExportConfig, export_task

    state = torch.load(tim_case.ckpt, map_location="cpu", weights_only=True)["state_dict"]
    # A non-TiM checkpoint under the TiM config: its frozen generation model is missing.
    plain = {k: v for k, v in state.items() if ".sampler." not in k and ".tokenizer." not in k
             and "tok_lulc" not in k}
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(TaskConfigError, match=r"no key model\.encoder\.sampler\.model\.\*"):
        export_task(TaskExportConfig(tim_case.config_path, tmp_path / "a", ckpt=tmp_path / "plain.pt"),
                    log=lambda s: None)
    # The TiM checkpoint under the non-TiM config of the same task.
    config = load_config(CONFIG, "terramind_v1_tiny")
    config["model"]["init_args"]["model_args"].pop("backbone_tim_modalities")
    path = write_config(config, tmp_path / "config.yaml")
    # Lightning's record of the training arguments names the setting; a plain state_dict, the weights.
    with pytest.raises(TaskConfigError, match=r"model_args\.backbone: the checkpoint .* trained with "
                                              r"'terramind_v1_tiny_tim' .*this config has 'terramind_v1_tiny'"):
        export_task(TaskExportConfig(path, tmp_path / "b", ckpt=tim_case.ckpt), log=lambda s: None)
    torch.save(state, tmp_path / "tim_plain.pt")
    with pytest.raises(TaskConfigError, match=r"holds a TiM backbone \(model\.encoder\.sampler\.model\.\*\)"):
        export_task(TaskExportConfig(path, tmp_path / "b", ckpt=tmp_path / "tim_plain.pt"), log=lambda s: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_tim_with_concat_merge_and_temporal_concat_matches_terratorch(tmp_path_factory):
    """The official TiM config with what it leaves out: modalities merged by 'concat', and the
    temporal wrapper (2 dates, 'concat' pooling) around the TiM backbone, which then thinks once
    per date. Logits at TiM temperature 0 against terratorch's."""
    import torch

    from tm_runtime import TerraMindRuntime

    config = load_config(CONFIG, "terramind_v1_tiny_tim")
    config["model"]["init_args"]["model_args"].update(
        backbone_merge_method="concat", backbone_use_temporal=True, backbone_temporal_pooling="concat",
        backbone_temporal_n_timestamps=2)
    case = make_tim_case(tmp_path_factory, config, "task_tim_temporal", seed=43)
    one = raw_inputs()
    raw = {k: np.stack([v, v[::-1]], axis=2) for k, v in one.items()}  # (B, C, T=2, H, W): other dates per sample
    for module in case.task.modules():
        if hasattr(module, "tim_temps"):
            module.tim_temps = 0.0  # read at forward time
    with torch.no_grad():
        ref = case.task(standardize_like_datamodule(case.config, raw)).output.numpy()
    rt = TerraMindRuntime(case.export)
    assert rt.task.temporal.pooling == "concat" and rt.task.merge_method == "concat"
    logits = rt.predict(raw, tim_temperature=0.0)
    assert logits.shape == ref.shape == (2, 2, 224, 224)
    err = rel_error(logits, ref)
    assert err <= MAX_REL, f"logits: relative error {err:.2e}"
    # The dates are not interchangeable: swapping them changes the prediction (concat keeps their order).
    swapped = rt.predict({k: v[:, :, ::-1] for k, v in raw.items()}, tim_temperature=0.0)
    assert rel_error(swapped, ref) > 100 * MAX_REL
