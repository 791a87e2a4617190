"""The terratorch side of ``tm-bench predict --compare-torch``: the real task model, built from
the config the export kept (``task_config.yaml``) and loaded with the same checkpoint.

Imports torch and terratorch; only ``predict`` imports this module, and only for --compare-torch.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tm_runtime.manifest import Manifest, sha256_file


def build_terratorch_task(manifest: Manifest, ckpt: Path | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """terratorch's task of this export, eval mode, with the checkpoint's weights."""
    import yaml

    weights = manifest.data["weights"]
    if weights.get("random_init"):
        raise ValueError("this export has random weights (--random-init): terratorch cannot be given the same "
                         "ones; export from a checkpoint (--ckpt) to compare")
    if ckpt is None:
        raise ValueError(f"--compare-torch needs --ckpt PATH (the export used {weights.get('file')})")
    digest = sha256_file(ckpt)
    if weights.get("sha256") and digest != weights["sha256"]:
        raise ValueError(f"--ckpt {ckpt} has sha256 {digest[:16]}…, the export was made from "
                         f"{weights['sha256'][:16]}…; the comparison would use other weights")
    config = yaml.safe_load((manifest.directory / manifest.data["files"]["task_config"]["file"]).read_text())
    import terratorch.tasks as tasks

    init = copy.deepcopy(config["model"]["init_args"])
    init["model_args"]["backbone_pretrained"] = False
    task = getattr(tasks, manifest.data["task"]["task_class"])(**init)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    task.load_state_dict(state.get("state_dict", state), strict=True)
    return task.eval(), {"weights": f"checkpoint {ckpt}", "task_class": manifest.data["task"]["task_class"]}


def terratorch_runner(task: torch.nn.Module, precision: str):
    """A ``run(inputs) -> output`` closure with the given float32 matmul precision ('highest' is
    fp32; 'medium' is what ``import terratorch`` leaves set, bf16 matmuls where the CPU has them)."""

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch.set_float32_matmul_precision(precision)
        try:
            with torch.inference_mode():
                out = task({k: torch.from_numpy(v) for k, v in inputs.items()}).output
        finally:
            torch.set_float32_matmul_precision("highest")
        out = out.numpy()
        return out if out.ndim == 4 else out[:, None]

    return run


@contextlib.contextmanager
def tim_temperature(task: torch.nn.Module, value: float):
    """Within the block, terratorch's TiM backbones (if any) sample at ``value`` (read per forward)."""
    backbones = [m for m in task.modules() if hasattr(m, "tim_temps")]
    saved = [m.tim_temps for m in backbones]
    for m in backbones:
        m.tim_temps = value
    try:
        yield
    finally:
        for m, old in zip(backbones, saved):
            m.tim_temps = old
