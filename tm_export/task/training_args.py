"""Is the config the one the checkpoint was trained with?

Weights only fix the shapes. A config that differs from training in what changes no shape (which
layers SelectIndices picks, the merge method, the temporal pooling, the order of the modalities
under concat, the head's activation) loads the checkpoint without complaint and predicts
nonsense. A Lightning checkpoint keeps the task's ``__init__`` arguments (``hyper_parameters``):
``model_factory`` and ``model_args`` are compared with the config's, and the first difference is
an error naming the key. Plain state_dicts carry no such record and are not checked.
"""
from __future__ import annotations

from collections.abc import Mapping

from .config import TaskConfigError

WHERE = "model.init_args"
# Settings that do not change what the trained model computes in eval mode.
IGNORED = ("backbone_pretrained", "backbone_ckpt_path")
_ABSENT = object()


def check_config_matches_training(config: Mapping, trained: Mapping | None, source: str) -> None:
    """Raise TaskConfigError at the first computation-relevant difference between the config's
    ``model.init_args`` and the checkpoint's ``hyper_parameters`` (None: nothing to compare)."""
    if not trained or not isinstance(trained.get("model_args"), Mapping):
        return
    init = (config.get("model") or {}).get("init_args") or {}
    pairs = [("model_factory", init.get("model_factory", _ABSENT), trained.get("model_factory", _ABSENT))]
    args, trained_args = init.get("model_args") or {}, trained["model_args"]
    keys = list(args) + [k for k in trained_args if k not in args]
    pairs += [(f"model_args.{k}", args.get(k, _ABSENT), trained_args.get(k, _ABSENT)) for k in keys
              if k not in IGNORED and "dropout" not in k]  # dropout: nothing in eval mode
    for key, ours, theirs in pairs:
        difference = _first_difference(ours, theirs, key)
        if difference is not None:
            where, ours, theirs = difference
            raise TaskConfigError(
                f"{WHERE}.{where}: the checkpoint {source} was trained with {_show(theirs)} (its hyper_parameters), "
                f"this config has {_show(ours)}; export with the config the model was fine-tuned with")


def _first_difference(ours: object, theirs: object, where: str) -> tuple[str, object, object] | None:
    if isinstance(ours, Mapping) and isinstance(theirs, Mapping):
        for key in list(ours) + [k for k in theirs if k not in ours]:
            found = _first_difference(ours.get(key, _ABSENT), theirs.get(key, _ABSENT), f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        if len(ours) != len(theirs):
            return where, ours, theirs
        for i, (a, b) in enumerate(zip(ours, theirs)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    same_number = (isinstance(ours, (int, float)) and isinstance(theirs, (int, float))
                   and isinstance(ours, bool) == isinstance(theirs, bool) and ours == theirs)
    return None if same_number or (type(ours) is type(theirs) and ours == theirs) else (where, ours, theirs)


def _show(value: object) -> str:
    return "nothing (not set)" if value is _ABSENT else repr(value)
