"""The ``--task-config`` path of tm-export (a fine-tuned terratorch task model)."""
from __future__ import annotations

import argparse

from .export import TaskExportConfig, export_task

# Flags that describe a backbone export: with --task-config the config says all of it.
BACKBONE_ONLY = {"model": "--model", "modalities": "--modalities", "output_modalities": "--output-modalities",
                 "tokenizer_ckpt": "--tokenizer-ckpt", "small_tokenizers": "--small-tokenizers",
                 "bands": "--bands", "tim_modalities": "--tim-modalities"}


def run_task_export(args: argparse.Namespace) -> dict:
    given = [flag for attr, flag in BACKBONE_ONLY.items() if getattr(args, attr, None)]
    if given:
        raise ValueError(f"{', '.join(given)} cannot be combined with --task-config: the task config's model: "
                         "section gives the backbone, its modalities and band subsets")
    config = TaskExportConfig(
        task_config=args.task_config, out=args.out, ckpt=args.ckpt, random_init=args.random_init, seed=args.seed,
        image_size=args.image_size, opset=args.opset, precision=args.precision, simplify=not args.no_simplify,
        validate=not args.no_validate, max_rel_error=args.rtol, overwrite=args.overwrite,
        calibration_data=args.calibration_data, gate_data=args.gate_data, int8_method=args.int8_method,
        int8_graphs=args.int8_graphs, int8_fc2=args.int8_fc2, tile_scale=dict(args.tile_scale),
        winograd=args.winograd,
    )
    return export_task(config, log=lambda s: print(s, flush=True))
