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


@pytest.fixture(scope="session")
def floods_tiny(tmp_path_factory) -> TaskCase:
    """The official tiny sen1floods11 config as is (S2L1C + S1GRD, mean merge), graphs validated."""
    return make_case(tmp_path_factory, "sen1floods11_tiny", None, seed=11)


@pytest.fixture(scope="session")
def burnscars_tiny(tmp_path_factory) -> TaskCase:
    """burnscars with a tiny backbone: a 6-band S2L2A subset, one list of means/stds."""
    return make_case(tmp_path_factory, "burnscars_base", "terramind_v1_tiny", seed=12, validate=False)


@pytest.fixture(scope="session")
def crop_tiny(tmp_path_factory) -> TaskCase:
    """multitemporal crop with a tiny backbone: temporal wrapper, 3 dates concatenated, 13 classes."""
    return make_case(tmp_path_factory, "multitemporal_crop_base", "terramind_v1_tiny", seed=13, validate=False)
