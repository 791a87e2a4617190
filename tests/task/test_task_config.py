"""Reading terratorch task configs and checkpoints: what is supported parses, everything else is
refused with the config key (or checkpoint key) that asked for it, and nothing is written."""
from __future__ import annotations

import copy
import os

import pytest
import torch

from tm_export.task.checkpoint import CheckpointError, read_task_checkpoint
from tm_export.task.config import TaskConfigError, parse_task_config
from tm_export.tim import TimSettings
from tm_export.task.model import build_task_model, expected_keys, load_task_state, randomize_task_model

from .terratorch_side import CONFIGS, load_config


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_official_configs_parse(path):
    spec = parse_task_config(load_config(path.stem))
    assert spec.task_type == "segmentation" and spec.decoder == "UNetDecoder"
    assert [n.name for n in spec.necks] == ["SelectIndices", "ReshapeTokensToImage", "LearnedInterpolateToPyramidal"]
    assert spec.standardization is not None  # from data:, or the crop datamodule's own statistics


def test_what_the_configs_say():
    floods = parse_task_config(load_config("sen1floods11_base"))
    assert floods.size == "base" and floods.modalities == ("S2L1C", "S1GRD") and floods.merge_method == "mean"
    assert floods.class_names == ("Others", "Flood") and floods.decoder_args == {"channels": [512, 256, 128, 64]}
    assert set(floods.standardization.mean) == {"S2L1C", "S1GRD"}  # the other modalities' stats are not needed
    burn = parse_task_config(load_config("burnscars_base"))
    assert burn.bands == {"S2L2A": ["BLUE", "GREEN", "RED", "NIR_NARROW", "SWIR_1", "SWIR_2"]}
    assert len(burn.standardization.mean["S2L2A"]) == 6
    crop = parse_task_config(load_config("multitemporal_crop_base"))
    assert crop.temporal.pooling == "concat" and crop.temporal.n_timestamps == 3 and crop.num_classes == 13
    assert crop.standardization.mean["S2L2A"][0] == pytest.approx(494.905781)
    tim = parse_task_config(load_config("tim_lulc_sen1floods11_base"))
    assert tim.size == "base" and tim.modalities == ("S2L1C", "S1GRD")
    # Upstream's defaults for what the config leaves out: chained, temperature 1, top-p 0.8, one step.
    assert tim.tim == TimSettings(("LULC",), chained=True, temperature=1.0, top_p=0.8, top_k=0, decoding_steps=1)


def _floods() -> dict:
    return load_config("sen1floods11_tiny")


def _set(config: dict, path: str, value) -> dict:
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return config


_DELETE = object()
ARGS = "model.init_args.model_args"


@pytest.mark.parametrize("path,value,match", [
    ("model", _DELETE, "not a terratorch task config: it has no 'model:' section"),
    ("model.class_path", "terratorch.tasks.ObjectDetectionTask", "model.class_path: .*ObjectDetectionTask"),
    ("model.init_args.model_factory", "SMPModelFactory", "model.init_args.model_factory"),
    (f"{ARGS}.backbone", "prithvi_eo_v2_300", f"{ARGS}.backbone: 'prithvi_eo_v2_300' is not supported"),
    (f"{ARGS}.decoder", "SMPDecoder", f"{ARGS}.decoder: 'SMPDecoder' is not supported"),
    (f"{ARGS}.decoder_bogus", 1, f"{ARGS}.decoder_bogus: UNetDecoder takes no argument 'bogus'"),
    (f"{ARGS}.necks", [{"name": "SelectIndices", "indices": [2, 5, 8, 11]}, {"name": "FeaturePyramidNetworkNeck"}],
     rf"{ARGS}.necks\[1\].name: 'FeaturePyramidNetworkNeck' is not supported"),
    (f"{ARGS}.backbone_merge_method", "dict", f"{ARGS}.backbone_merge_method: 'dict'"),
    (f"{ARGS}.backbone_modalities", ["S2L1C", "LULC"], f"{ARGS}.backbone_modalities: 'LULC' is a tokenised input"),
    (f"{ARGS}.backbone_modalities", ["S2L1C", "S3"], f"{ARGS}.backbone_modalities: unknown modality 'S3'"),
    (f"{ARGS}.backbone_bands", {"S2L1C": ["BLUE", "PURPLE"]}, f"{ARGS}.backbone_bands.S2L1C: band.* PURPLE"),
    (f"{ARGS}.backbone_img_size", 256, f"{ARGS}.backbone_img_size: 256 is not supported"),
    (f"{ARGS}.backbone_use_temporal", True, None),  # fine: mean pooling over any number of dates
    (f"{ARGS}.peft_config", {"method": "LORA"}, f"{ARGS}.peft_config: not supported"),
    (f"{ARGS}.num_classes", _DELETE, f"{ARGS}.num_classes: a segmentation task needs a positive integer"),
    (f"{ARGS}.head_bogus", 0, f"{ARGS}.head_bogus"),
    ("model.init_args.class_names", ["only one"], "model.init_args.class_names: 1 names for num_classes=2"),
    ("data.init_args.means.S1GRD", [-12.6], r"data.init_args.means.S1GRD: expected 2 values"),
    ("data.init_args.stds", _DELETE, "data.init_args.stds: missing"),
    # wrongly typed values: an error naming the key, not a traceback from torch
    (f"{ARGS}.head_channel_list", "x", f"{ARGS}.head_channel_list: expected a non-empty list of integers"),
    (f"{ARGS}.head_channel_list", [16.5], f"{ARGS}.head_channel_list: expected a non-empty list of integers"),
    (f"{ARGS}.num_classes", True, f"{ARGS}.num_classes: a segmentation task needs a positive integer, got True"),
    (f"{ARGS}.rescale", "no", f"{ARGS}.rescale: expected true or false, got 'no'"),
    # a misspelt modality among the statistics, when the model's modality then has none
    ("data.init_args.means", {"S2L1c_typo": [0.0] * 13, "S1GRD": [0.0, 0.0]},
     "data.init_args.means.S2L1c_typo: not a modality name, and the model's S2L1C has no statistics"),
])
def test_unsupported_configs_name_the_key(path, value, match):
    config = _set(_floods(), path, value)
    if match is None:
        parse_task_config(config)
        return
    with pytest.raises(TaskConfigError, match=match):
        parse_task_config(config)


@pytest.mark.parametrize("temporal,match", [
    ({"backbone_temporal_pooling": "keep"}, "backbone_temporal_pooling: 'keep' is not supported"),
    ({"backbone_temporal_pooling": "concat"}, "backbone_temporal_n_timestamps: concat pooling needs n_timestamps"),
    ({"backbone_temporal_pooling": "diff", "backbone_temporal_subset_lengths": [1, 1, 1]},
     "diff pooling needs exactly two subsets"),
    ({"backbone_temporal_subset_lengths": [1, 1], "backbone_temporal_n_timestamps": 3}, "sum to 2"),
    ({"backbone_temporal_n_timestamps": True}, "backbone_temporal_n_timestamps: expected a positive integer, got True"),
])
def test_unsupported_temporal_settings(temporal, match):
    config = _floods()
    config["model"]["init_args"]["model_args"].update({"backbone_use_temporal": True, **temporal})
    with pytest.raises(TaskConfigError, match=match):
        parse_task_config(config)


@pytest.mark.parametrize("change,match", [
    ({"backbone_tim_modalities": ["caption"]}, "backbone_tim_modalities: unknown output modality 'caption'"),
    ({"backbone_tim_modalities": ["coords"]}, "backbone_tim_modalities: TiM modality 'coords': only image"),
    ({"backbone_tim_modalities": ["S1GRD"]}, "backbone_tim_modalities: S1GRD is also among backbone_modalities"),
    ({"backbone_tim_modalities": "LULC"}, "backbone_tim_modalities: expected a list"),
    ({"backbone_tim_modalities": ["LULC", "LULC"]}, "backbone_tim_modalities: a TiM modality is listed twice"),
    ({"backbone_tim_temps": -1.0}, "backbone_tim_temps: .*temperature must be"),
    ({"backbone_tim_top_k": 1.5}, "backbone_tim_top_k: expected int, got 1.5"),
    ({"backbone_tim_decoding_steps": 0}, "backbone_tim_decoding_steps: tim_decoding_steps must be an int >= 1"),
    ({"backbone_bands": {"S2L1C": ["RED"]}}, "backbone_bands: TiM backbones take no band subsets"),
    ({"backbone": "terramind_v1_tiny"}, "backbone_tim_modalities: only _tim backbones take TiM arguments"),
])
def test_unsupported_tim_settings_name_the_key(change, match):
    config = load_config("tim_lulc_sen1floods11_base", "terramind_v1_tiny_tim")
    config["model"]["init_args"]["model_args"].update(change)
    with pytest.raises(TaskConfigError, match=f"{ARGS}.{match}"):
        parse_task_config(config)


def test_tim_settings_from_the_config():
    config = load_config("tim_lulc_sen1floods11_base", "terramind_v1_tiny_tim")
    config["model"]["init_args"]["model_args"].update({"backbone_tim_modalities": ["NDVI", "LULC"],
                                                       "backbone_tim_top_p": 0.0, "backbone_tim_temps": 0.5})
    tim = parse_task_config(config).tim
    # upstream's top_p=0 (no nucleus filter) is our 1.0
    assert tim.modalities == ("NDVI", "LULC") and tim.top_p == 1.0 and tim.temperature == 0.5


# ---- checkpoints ----
@pytest.fixture(scope="module")
def floods_model():
    model = build_task_model(parse_task_config(_floods()))
    randomize_task_model(model, seed=3)
    return model


@pytest.fixture(scope="module")
def blank_model():
    """A second model to load into (zeroed before each load); building one takes seconds."""
    return build_task_model(parse_task_config(_floods()))


def task_state(model) -> dict[str, torch.Tensor]:
    """The task model's state_dict in terratorch's key space (no ``model.`` prefix)."""
    return {key: module.state_dict()[inner].clone() for key, (module, inner) in expected_keys(model).items()}


@pytest.mark.parametrize("layout", ["lightning", "plain_prefixed", "plain"])
def test_checkpoint_layouts_load(floods_model, blank_model, tmp_path, layout):
    state = task_state(floods_model)
    prefixed = {f"model.{k}": v for k, v in state.items()}
    payload = {"lightning": {"epoch": 3, "global_step": 120, "state_dict": {**prefixed, "criterion.weight":
                                                                            torch.ones(2)}},
               "plain_prefixed": prefixed, "plain": state}[layout]
    path = tmp_path / "weights.ckpt"
    torch.save(payload, path)
    loaded, info = read_task_checkpoint(path)
    assert set(loaded) == set(state)  # prefix off, the loss's buffer dropped
    fresh = blank_model
    with torch.no_grad():
        for tensor in [*fresh.encoder.state_dict().values(), *fresh.head.state_dict().values()]:
            tensor.zero_()
    load_task_state(fresh, loaded, str(path))
    assert torch.equal(fresh.head.state_dict()["head.head.2.weight"], state["head.head.2.weight"])
    key = "encoder.encoder.11.mlp.fc2.weight"
    assert torch.equal(fresh.encoder.state_dict()[key[len("encoder."):]], state[key])
    assert info["format"] == ("lightning" if layout == "lightning" else "torch")


class _Payload:
    """Unpickling this runs os.system: a checkpoint that carries code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.head.head.2.bias": torch.zeros(2)}, "hook": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load.*could execute code") as refused:
        read_task_checkpoint(path)
    assert not marker.exists()
    assert "system" in str(refused.value)  # names what the file asked for, not torch's general advice
    with pytest.raises(CheckpointError, match="is a directory; pass the .ckpt file in it"):
        read_task_checkpoint(tmp_path)


def test_files_that_are_not_torch_checkpoints_say_what_they_are(tmp_path):
    """A plain pickle.dump (of tensors, or with code: never run), a text file, a truncated torch file."""
    import pickle

    marker = tmp_path / "ran"
    plain = tmp_path / "weights.pkl"
    plain.write_bytes(pickle.dumps({"model.head.head.2.bias": torch.zeros(2), "hook": _Payload(marker)}))
    with pytest.raises(CheckpointError, match="a plain Python pickle, not a torch.save or Lightning checkpoint"):
        read_task_checkpoint(plain)
    assert not marker.exists()
    text = tmp_path / "notes.ckpt"
    text.write_text("model:\n  init_args: {}\n")
    with pytest.raises(CheckpointError, match="not in a format tm-export reads"):
        read_task_checkpoint(text)
    whole = tmp_path / "whole.ckpt"
    torch.save({"model.head.head.2.bias": torch.zeros(2)}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.ckpt: not a torch checkpoint"):
        read_task_checkpoint(cut)


NECK_PLAIN = [{"name": "SelectIndices", "indices": [2, 5, 8, 11]}, {"name": "ReshapeTokensToImage"}]


@pytest.mark.parametrize("args,match", [
    ({"necks": [{"name": "SelectIndices", "indices": 3}]},
     r"necks\[0\].indices: expected a non-empty list of integers"),
    ({"necks": [{"name": "SelectIndices", "indices": [2, 20]}]}, r"necks\[0\].indices: \[20\] out of range for 12"),
    ({"necks": NECK_PLAIN + [{"name": "PermuteDims"}]}, r"necks\[2\].new_order: PermuteDims needs new_order"),
    ({"necks": NECK_PLAIN + [{"name": "InterpolateToPyramidal", "scale_factor": "x"}]},
     r"necks\[2\].scale_factor: expected a positive integer, got 'x'"),
    ({"necks": NECK_PLAIN, "decoder": "FCNDecoder", "decoder_in_index": 7},
     "decoder_in_index: FCNDecoder with {'in_index': 7} failed .*IndexError"),
    ({"necks": NECK_PLAIN, "decoder": "IdentityDecoder", "decoder_out_index": 9},
     "decoder_out_index: IdentityDecoder with {'out_index': 9} failed .*IndexError"),
])
def test_bad_neck_and_decoder_values_name_the_key(args, match):
    """Values that only fail once the modules are built: still a TaskConfigError naming the key."""
    config = copy.deepcopy(_floods())
    model_args = config["model"]["init_args"]["model_args"]
    for key in ("decoder", "decoder_channels"):
        model_args.pop(key, None)
    model_args.update(args)
    with pytest.raises(TaskConfigError, match=f"{ARGS}.{match}"):
        build_task_model(parse_task_config(config))


def test_config_is_compared_with_the_checkpoints_training_arguments():
    """What weights cannot show (layers, merge, pooling) is compared with the hyper_parameters a
    Lightning checkpoint keeps; settings without effect in eval mode are not."""
    from tm_export.task.training_args import check_config_matches_training

    config = _floods()
    trained = copy.deepcopy(config["model"]["init_args"])
    check_config_matches_training(config, trained, "c.ckpt")
    check_config_matches_training(config, None, "c.ckpt")  # a plain state_dict: nothing to compare
    relaxed = copy.deepcopy(trained)
    relaxed["model_args"].update(backbone_pretrained=True, head_dropout=0.5)
    relaxed["model_args"]["necks"][0]["indices"] = tuple(relaxed["model_args"]["necks"][0]["indices"])
    check_config_matches_training(config, relaxed, "c.ckpt")
    for edit, match in [
        (lambda a: a.update(backbone_merge_method="max"), r"model_args.backbone_merge_method: the checkpoint c.ckpt "
                                                          r"was trained with 'max' .*this config has 'mean'"),
        (lambda a: a["necks"][0].update(indices=[1, 4, 7, 10]), r"model_args.necks\[0\].indices\[0\]: .* with 1 "),
        (lambda a: a.update(backbone_temporal_pooling="max"),
         "model_args.backbone_temporal_pooling: .* 'max' .* nothing"),
    ]:
        changed = copy.deepcopy(trained)
        edit(changed["model_args"])
        with pytest.raises(TaskConfigError, match=f"model.init_args.{match}"):
            check_config_matches_training(config, changed, "c.ckpt")


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("head.head.2.bias"), "missing key model.head.head.2.bias"),
    (lambda s: s.update({"neck.2.fpn5.weight": torch.zeros(1)}), "unexpected key model.neck.2.fpn5.weight"),
    (lambda s: s.update({"head.head.2.weight": torch.zeros(5, 32, 1, 1)}),
     r"model.head.head.2.weight has shape \(5, 32, 1, 1\), the config builds \(2, 32, 1, 1\)"),
    (lambda s: s.update({"aux_heads.x.0.weight": torch.zeros(1)}), "auxiliary heads"),
])
def test_checkpoints_that_do_not_match_the_config(floods_model, edit, match):
    state = task_state(floods_model)
    edit(state)
    with pytest.raises(TaskConfigError, match=match):  # checked before anything is loaded
        load_task_state(floods_model, state, "ckpt")


def test_a_backbone_checkpoint_is_not_a_task_checkpoint(tmp_path):
    path = tmp_path / "TerraMind_v1_tiny.pt"
    torch.save({"encoder_embeddings.untok_sen2l2a@224.mod_emb": torch.zeros(1, 1, 192)}, path)
    with pytest.raises(CheckpointError, match="is not part of a terratorch task model"):
        read_task_checkpoint(path)


def test_cli_reports_a_mismatched_checkpoint_and_writes_nothing(floods_model, tmp_path, capsys):
    from tm_export.cli import main

    config = _set(_floods(), f"{ARGS}.num_classes", 5)
    config = _set(config, "model.init_args.class_names", [str(i) for i in range(5)])
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    torch.save({f"model.{k}": v for k, v in task_state(floods_model).items()}, tmp_path / "w.ckpt")
    out = tmp_path / "out"
    assert main(["--task-config", str(tmp_path / "c.yaml"), "--ckpt", str(tmp_path / "w.ckpt"),
                 "--out", str(out)]) == 1
    assert "model.head.head.2.weight has shape (2, 32, 1, 1)" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert main(["--task-config", str(tmp_path / "c.yaml"), "--model", "tiny", "--out", str(out)]) == 1
    assert "--model cannot be combined with --task-config" in capsys.readouterr().err


def test_cli_refuses_a_config_the_checkpoint_was_not_trained_with(floods_model, tmp_path, capsys):
    """Same shapes, other merge method: the weights load, the Lightning hyper_parameters tell."""
    from tm_export.cli import main
    import yaml

    trained = _floods()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_set(trained, f"{ARGS}.backbone_merge_method", "max")))
    torch.save({"state_dict": {f"model.{k}": v for k, v in task_state(floods_model).items()},
                "hyper_parameters": copy.deepcopy(trained["model"]["init_args"])}, tmp_path / "w.ckpt")
    out = tmp_path / "out"
    assert main(["--task-config", str(tmp_path / "c.yaml"), "--ckpt", str(tmp_path / "w.ckpt"),
                 "--out", str(out)]) == 1
    assert "backbone_merge_method: the checkpoint" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_export_warns_when_the_config_has_no_statistics(tmp_path, capsys):
    """The export works (standardize=False inputs), but the default predict would refuse: say so now."""
    from tm_export.cli import main
    import yaml

    config = _set(_floods(), "data.init_args.means", {"S2L1C": _floods()["data"]["init_args"]["means"]["S2L1C"]})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["--task-config", str(tmp_path / "c.yaml"), "--random-init", "--no-validate",
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr()
    assert "gives no means/stds for S1GRD: predict(standardize=True)" in printed.out + printed.err


def test_weights_of_another_backbone_are_named_by_the_training_record(floods_model, tmp_path, capsys):
    """Keys and shapes do not fit (a tiny checkpoint, a small config): where the checkpoint says how
    it was trained, the error names the setting that differs, not the first odd key."""
    from tm_export.cli import main
    import yaml

    trained = _floods()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_set(trained, f"{ARGS}.backbone", "terramind_v1_small")))
    weights = {f"model.{k}": v for k, v in task_state(floods_model).items()}
    torch.save({"state_dict": weights, "hyper_parameters": copy.deepcopy(trained["model"]["init_args"])},
               tmp_path / "fit.ckpt")
    out = tmp_path / "out"
    assert main(["--task-config", str(tmp_path / "c.yaml"), "--ckpt", str(tmp_path / "fit.ckpt"),
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "model.init_args.model_args.backbone: the checkpoint" in err
    assert "'terramind_v1_tiny'" in err and "'terramind_v1_small'" in err
    assert not out.exists()
    torch.save(weights, tmp_path / "plain.ckpt")  # no record: the weights' own error
    assert main(["--task-config", str(tmp_path / "c.yaml"), "--ckpt", str(tmp_path / "plain.ckpt"),
                 "--out", str(out)]) == 1
    assert "model.encoder." in capsys.readouterr().err
