"""Session fixtures for the task tests: per config, the real terratorch task with every tensor
random, its checkpoint written by a Lightning Trainer, and our export of it (made once)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .terratorch_side import build_task, load_config, randomize_all, save_like_fit, write_config


@dataclass
class TaskCase:
    config: dict
    config_path: Path
    ckpt: Path
    export: Path
    task: object  # terratorch's task, eval mode, the weights in ``ckpt``


def make_case(tmp_path_factory, name: str, backbone: str | None, seed: int, validate: bool = True) -> TaskCase:
    from tm_export.cli import main

    config = load_config(name, backbone)
    folder = tmp_path_factory.mktemp(f"task_{name}")
    path = write_config(config, folder / "config.yaml")
    task = build_task(config)
    randomize_all(task.model, seed)
    task.eval()
    ckpt = save_like_fit(task, folder / "last.ckpt")
    argv = ["--task-config", str(path), "--ckpt", str(ckpt), "--out", str(folder / "export")]
    assert main(argv + ([] if validate else ["--no-validate"])) == 0
    return TaskCase(config, path, ckpt, folder / "export", task)


# floods_tiny (the official tiny sen1floods11 task) and crop_tiny (multitemporal crop) are in tests/conftest.py:
# the scene tests use them too.


@pytest.fixture(scope="session")
def burnscars_tiny(tmp_path_factory) -> TaskCase:
    """burnscars with a tiny backbone: a 6-band S2L2A subset, one list of means/stds."""
    return make_case(tmp_path_factory, "burnscars_base", "terramind_v1_tiny", seed=12, validate=False)


MULTI_CONFIG = {
    # Not an official config: what the official ones leave out. Two modalities merged by 'concat'
    # (a 4-band S2L2A subset and S1GRD), three dates averaged in subsets [1, 2] then 'mean', a
    # small UNet; statistics for S2L2A only (S1GRD arrives standardised or not at all).
    "data": {"class_path": "terratorch.datamodules.GenericMultiModalDataModule",
             "init_args": {"modalities": ["S2L2A", "S1GRD"],
                           "means": {"S2L2A": [1500.0, 1700.0, 1800.0, 3000.0]},
                           "stds": {"S2L2A": [2100.0, 2000.0, 2100.0, 1800.0]}}},
    "model": {"class_path": "terratorch.tasks.SemanticSegmentationTask", "init_args": {
        "model_factory": "EncoderDecoderFactory", "class_names": ["a", "b", "c"],
        "model_args": {
            "backbone": "terramind_v1_tiny", "backbone_pretrained": True, "backbone_modalities": ["S2L2A", "S1GRD"],
            "backbone_bands": {"S2L2A": ["BLUE", "GREEN", "RED", "NIR_NARROW"]}, "backbone_merge_method": "concat",
            "backbone_use_temporal": True, "backbone_temporal_pooling": "mean",
            "backbone_temporal_subset_lengths": [1, 2], "backbone_temporal_n_timestamps": 3,
            "necks": [{"name": "SelectIndices", "indices": [1, 4, 7, 10]}, {"name": "ReshapeTokensToImage"},
                      {"name": "LearnedInterpolateToPyramidal"}],
            "decoder": "UNetDecoder", "decoder_channels": [64, 32, 32, 16], "num_classes": 3}}},
}


@pytest.fixture(scope="session")
def multi_case(tmp_path_factory) -> TaskCase:
    """MULTI_CONFIG from a terratorch-written checkpoint; without terratorch, a --random-init export
    (``task`` None) so that the runtime's input checks still run."""
    import importlib.util

    from tm_export.cli import main

    folder = tmp_path_factory.mktemp("task_multi")
    path = write_config(MULTI_CONFIG, folder / "config.yaml")
    argv = ["--task-config", str(path), "--out", str(folder / "export"), "--no-validate"]
    if importlib.util.find_spec("terratorch") is None:
        assert main(argv + ["--random-init", "--seed", "5"]) == 0
        return TaskCase(MULTI_CONFIG, path, None, folder / "export", None)
    task = build_task(MULTI_CONFIG)
    randomize_all(task.model, 14)
    task.eval()
    ckpt = save_like_fit(task, folder / "last.ckpt")
    assert main(argv + ["--ckpt", str(ckpt)]) == 0
    return TaskCase(MULTI_CONFIG, path, ckpt, folder / "export", task)


@pytest.fixture(scope="session")
def floods_base(tmp_path_factory) -> TaskCase:
    """The official base sen1floods11 config as is (graph validation skipped: predict is compared
    with terratorch end to end, and a base encoder's validation alone takes a minute)."""
    return make_case(tmp_path_factory, "sen1floods11_base", None, seed=21, validate=False)
