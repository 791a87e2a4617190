"""Read what ``terratorch fit`` writes, without ever executing code from the file.

A Lightning checkpoint (``*.ckpt``: a pickle whose ``state_dict`` holds the task's weights under
``model.``) or a plain state_dict of the task model, with or without that prefix; ``.safetensors``
too. Pickles are read with ``torch.load(weights_only=True)``, whose unpickler only rebuilds
tensors and plain containers: a file that needs anything else is refused, never run.
"""
from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import torch

TASK_PARTS = ("encoder", "neck", "decoder", "head", "aux_heads")
TRAINING_ARGS = "hyper_parameters"  # key of read_task_checkpoint's facts; not JSON, not for the manifest


class CheckpointError(RuntimeError):
    """The checkpoint cannot be read safely, or does not hold a task model's weights."""


# torch.save's two formats: a zip archive, or (before torch 1.6) a pickle that starts with this magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
_PICKLE_PROTO = b"\x80"  # a pickle of protocol 2 or later starts with PROTO


def _load_pickle(path: Path) -> object:
    with path.open("rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if not (head.startswith(_ZIP_MAGIC) or head == _LEGACY_TORCH_MAGIC):
        # torch's safe unpickler cannot read a plain pickle.dump, and unpickling it otherwise would run
        # any code it holds: say what the file is rather than where torch's loader stumbled.
        what = "a plain Python pickle" if head.startswith(_PICKLE_PROTO) else "not in a format tm-export reads"
        raise CheckpointError(
            f"{path}: {what}, not a torch.save or Lightning checkpoint; tm-export reads those and .safetensors, "
            "never arbitrary pickles. If you trust a pickle, re-save its weights: import pickle, torch; "
            "torch.save(pickle.load(open(PATH, 'rb')), 'weights.pt')")
    try:
        with warnings.catch_warnings():  # protocol notes of torch's safe unpickler: not the user's concern
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global outside its allow-list (e.g. os.system, a custom class).
        raise CheckpointError(
            f"{path}: refusing to load: the pickle needs Python objects beyond tensors and plain containers "
            f"({_refused_object(str(exc))}); unpickling it could execute code from the file. If you trust the "
            "file, re-save its weights alone: ckpt = torch.load(PATH, weights_only=False); "
            "torch.save(ckpt.get('state_dict', ckpt), 'weights.pt')"
        ) from None
    except Exception as exc:  # torch raises several types for files that are not checkpoints
        raise CheckpointError(f"{path}: not a torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _refused_object(message: str) -> str:
    """The line of torch's refusal that names what the file asked for (torch's wording has
    changed between releases; its first line is general advice, not the reason)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for marker in ("Unsupported global:", "unsupported GLOBAL", "Unsupported operand", "Unsupported class"):
        for line in lines:
            if marker in line:
                return line.split("Unsupported global:")[-1].strip()
    return lines[0] if lines else "no detail given"


def read_task_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(task-model state_dict with keys ``encoder.* / neck.* / decoder.* / head.*``, facts about the file;
    a Lightning checkpoint's ``hyper_parameters`` under ``TRAINING_ARGS``)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; pass the .ckpt file in it (terratorch fit "
                              "writes e.g. checkpoints/last.ckpt)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    info: dict = {}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw: object = load_file(str(path))
        info["format"] = "safetensors"
    else:
        raw = _load_pickle(path)
        info["format"] = "torch"
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        info["format"] = "lightning"
        for key in ("epoch", "global_step", "pytorch-lightning_version"):
            if isinstance(raw.get(key), (int, str)):
                info[key.replace("-", "_")] = raw[key]
        if isinstance(raw.get("hyper_parameters"), dict):  # the task's __init__ arguments, as trained
            info[TRAINING_ARGS] = raw["hyper_parameters"]
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, not a state_dict of a task model")
    bad = [k for k, v in raw.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entry {bad[0]!r} is not a tensor; expected a state_dict")
    return strip_prefix(raw, str(path)), info


def strip_prefix(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Lightning's ``model.`` prefix off; keys must then start with a PixelWiseModel part.

    Beside ``model.*`` a task's state_dict may hold training-only buffers (a weighted loss's
    ``criterion.weight``); those are dropped.
    """
    if any(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    stray = [k for k in state if k.split(".", 1)[0] not in TASK_PARTS]
    if stray:
        raise CheckpointError(
            f"{source}: key {stray[0]!r} is not part of a terratorch task model (expected 'model.encoder.*', "
            "'model.neck.*', 'model.decoder.*', 'model.head.*', with or without the 'model.' prefix); is this a "
            "fine-tuned task checkpoint?")
    return state
