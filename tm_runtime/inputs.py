"""Checks on user inputs: every error names the modality and what was expected against what came."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .manifest import ModalityEntry
from .modalities import canonical_name

PATCH_SIZE = 16


def resolve_names(inputs: Mapping[str, object], available: Mapping[str, ModalityEntry],
                  where: str = "--modalities") -> dict[str, object]:
    """Map user spellings to the export's modality names, keeping the caller's order. ``where``:
    what chose the exported modalities (the hint of the error for a modality not among them)."""
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict of modality name -> numpy array, got {type(inputs).__name__}")
    if len(inputs) == 0:
        raise ValueError(f"inputs is empty: pass at least one of the exported modalities ({', '.join(available)})")
    resolved: dict[str, object] = {}
    for user_name, value in inputs.items():
        try:
            name = canonical_name(user_name)
        except ValueError as exc:
            raise ValueError(f"{exc} (this export has {', '.join(available)})") from None
        if name not in available:
            raise ValueError(
                f"modality {name} was not exported (exported modalities: {', '.join(available)}); "
                f"re-export with {name} in {where}"
            )
        if name in resolved:
            raise ValueError(f"modality {name} given twice (as {user_name!r} and another spelling)")
        resolved[name] = value
    return resolved


def check_image(name: str, value: object, spec: ModalityEntry, image_size: int, check_finite: bool) -> np.ndarray:
    """Return ``value`` as a contiguous float32 (B, C, H, W) array, or raise naming what is wrong."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(value).__name__}")
    if not np.issubdtype(value.dtype, np.floating):
        raise TypeError(f"{name}: expected a floating-point array (float32), got dtype {value.dtype}")
    if value.ndim != 4:
        raise ValueError(
            f"{name}: expected a 4-D array (batch, {spec.num_channels}, H, W), got shape {tuple(value.shape)}"
        )
    batch, channels, height, width = value.shape
    if batch < 1:
        raise ValueError(f"{name}: batch size must be at least 1, got shape {tuple(value.shape)}")
    if channels != spec.num_channels:
        raise ValueError(
            f"{name}: expected {spec.num_channels} channels ({', '.join(spec.bands)}), got {channels} "
            f"(shape {tuple(value.shape)})"
        )
    if (height, width) != (image_size, image_size):
        if height % PATCH_SIZE or width % PATCH_SIZE:  # no export takes this size: crop, pad or tile
            hint = (f"exports take square sizes that are multiples of {PATCH_SIZE}: crop or pad to "
                    f"{image_size}x{image_size}, or tile larger scenes (tm-run)")
        else:
            hint = f"re-export with --image-size {max(height, width)} for square inputs of that size"
        raise ValueError(f"{name}: expected {image_size}x{image_size} pixels (the size this export was made for), "
                         f"got {height}x{width}; {hint}")
    array = np.ascontiguousarray(value, dtype=np.float32)
    if check_finite and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise ValueError(f"{name}: input contains {bad} NaN or Inf values (pass check_finite=False to allow)")
    return array


def class_map_to_one_hot(name: str, value: object, spec: ModalityEntry) -> object:
    """A class map (B, H, W) or (B, 1, H, W) -> one-hot float32 (B, C, H, W); other values pass.

    Integer arrays are class maps. So are float arrays of those shapes when the modality has more
    than one channel (LULC: a (B, 1, H, W) float array can only be a class map, e.g. as read from a
    GeoTIFF), provided every value is a whole class id. LULC's tokenizer reads one-hot maps;
    upstream one-hot encodes class maps the same way (and fails on ids outside the classes, as we
    do, with a message).
    """
    if not isinstance(value, np.ndarray):
        return value
    classes = spec.num_channels
    if np.issubdtype(value.dtype, np.floating):
        if classes == 1 or not (value.ndim == 3 or (value.ndim == 4 and value.shape[1] == 1)):
            return value  # a one-hot (B, C, H, W) map, or not a class map at all: checked as an image
        whole = np.isfinite(value).all() and bool((value == np.round(value)).all())
        if not whole:
            raise ValueError(f"{name}: a {value.dtype} array of shape {tuple(value.shape)} is read as a class map, "
                             f"whose values must be whole class ids 0..{classes - 1}; got fractional or non-finite "
                             f"values. Pass integer class ids, or a one-hot float array (B, {classes}, H, W)")
    elif not np.issubdtype(value.dtype, np.integer):
        return value
    if value.ndim == 4 and value.shape[1] == 1:
        value = value[:, 0]
    if value.ndim != 3:
        raise ValueError(f"{name}: a class map must be (B, H, W) or (B, 1, H, W), got shape {tuple(value.shape)}")
    low, high = value.min(), value.max()
    if low < 0 or high >= classes:
        raise ValueError(f"{name}: class ids must lie in [0, {classes}), got values in [{low:g}, {high:g}]")
    return np.ascontiguousarray(np.eye(classes, dtype=np.float32)[value.astype(np.int64)].transpose(0, 3, 1, 2))


def check_same_batch(arrays: Mapping[str, np.ndarray]) -> int:
    sizes = {name: a.shape[0] for name, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{n}={b}" for n, b in sizes.items())
        raise ValueError(f"all modalities must have the same batch size, got {listed}")
    return next(iter(sizes.values()))


def standardize(array: np.ndarray, spec: ModalityEntry) -> np.ndarray:
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (array - mean) / std
