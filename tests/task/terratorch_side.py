"""The terratorch side of the task parity tests: the real task built from a config, every tensor
randomised, a checkpoint written by a Lightning Trainer as ``terratorch fit`` writes it, and the
datamodule's own standardisation for raw inputs."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import yaml

CONFIGS = Path(__file__).resolve().parent / "configs"


def load_config(name: str, backbone: str | None = None) -> dict:
    """A test config by file stem; ``backbone`` swaps the backbone (tiny for CI speed)."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    if backbone:
        config["model"]["init_args"]["model_args"]["backbone"] = backbone
    return config


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def import_tasks():
    """terratorch's task classes, or a skip; resets the matmul precision terratorch lowers."""
    pytest.importorskip("terratorch", reason="terratorch not installed: pip install '.[parity]'")
    import torch
    from terratorch.tasks import PixelwiseRegressionTask, SemanticSegmentationTask

    torch.set_float32_matmul_precision("highest")
    return {"SemanticSegmentationTask": SemanticSegmentationTask, "PixelwiseRegressionTask": PixelwiseRegressionTask}


def build_task(config: dict):
    """The real terratorch task of ``config`` (random init instead of the pretrained download)."""
    classes = import_tasks()
    init = copy.deepcopy(config["model"]["init_args"])
    init["model_args"]["backbone_pretrained"] = False
    task = classes[config["model"]["class_path"].rsplit(".", 1)[-1]](**init)
    return task


def randomize_all(module, seed: int) -> None:
    """Every floating parameter and buffer random (positional tables, zero LayerNorm bias buffers,
    BatchNorm statistics too): nothing may hide behind an initial value."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
            elif tensor.dim() == 1 and name.endswith("weight"):
                tensor.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 50
                tensor.copy_(noise * min(0.05, fan_in ** -0.5))


def save_like_fit(task, path: Path) -> Path:
    """``trainer.save_checkpoint``, as ``terratorch fit`` ends: a Lightning .ckpt with the task's
    state_dict (``model.`` prefix), hyper-parameters, loops and callbacks."""
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.strategy.connect(task)
    trainer.save_checkpoint(path)
    return path


def standardize_like_datamodule(config: dict, raw: dict[str, np.ndarray]):
    """Raw arrays -> the torch tensors the config's datamodule would hand the model."""
    import torch

    data = config["data"]
    init = data.get("init_args", {})
    tensors = {k: torch.from_numpy(v.copy()) for k, v in raw.items()}
    datamodule = data["class_path"].rsplit(".", 1)[-1]
    if datamodule == "GenericMultiModalDataModule":
        from terratorch.datamodules.generic_multimodal_data_module import MultimodalNormalize

        return MultimodalNormalize(init["means"], init["stds"])({"image": tensors})["image"]
    if datamodule == "MultiTemporalCropClassificationDataModule":
        from terratorch.datamodules.multi_temporal_crop_classification import MultiTemporalCropClassificationDataModule

        normalize = MultiTemporalCropClassificationDataModule(data_root="unused").aug
    else:
        from terratorch.datamodules.utils import Normalize

        normalize = Normalize(init["means"], init["stds"])
    (name, image), = tensors.items()
    return {name: normalize({"image": image})["image"]}
