"""Band subsets: pick patch-embedding columns by band name, as terratorch's ``bands=`` does."""
from __future__ import annotations

import torch

from tm_runtime.modalities import canonical_name, get_modality

from .reference.embeddings import PATCH_SIZE, ImageEncoderEmbedding


def parse_bands(items: list[str] | None) -> dict[str, list[str]]:
    """``["S2L2A=BLUE,GREEN,RED"]`` -> ``{"S2L2A": ["BLUE", "GREEN", "RED"]}`` (checked names)."""
    out: dict[str, list[str]] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--bands takes MODALITY=BAND1,BAND2,...; got {item!r}")
        mod_name, _, listed = item.partition("=")
        name = canonical_name(mod_name.strip())
        bands = [b.strip().upper() for b in listed.split(",") if b.strip()]
        check_bands(name, bands)
        out[name] = bands
    return out


def check_bands(name: str, bands: list[str]) -> None:
    known = get_modality(name).bands
    if not bands:
        raise ValueError(f"{name}: the band list is empty")
    unknown = [b for b in bands if b not in known]
    if unknown:
        # Upstream would give unknown bands random columns; an exported model should not.
        raise ValueError(f"{name}: unknown band(s) {', '.join(unknown)}; pretrained bands are {', '.join(known)}")
    if len(set(bands)) != len(bands):
        raise ValueError(f"{name}: a band is listed twice in {bands}")


def select_bands(embedding: ImageEncoderEmbedding, pretrained: tuple[str, ...], chosen: list[str]) -> None:
    """Replace the embedding's projection by the columns of ``chosen`` bands, in that order.

    The Linear's columns are (pixel, channel) with the channel fastest, so the weight is viewed
    as (D, 256 pixels, C) and sliced along C.
    """
    dim = embedding.dim
    weight = embedding.proj.weight.detach().reshape(dim, PATCH_SIZE * PATCH_SIZE, len(pretrained))
    picked = weight[:, :, [pretrained.index(b) for b in chosen]].reshape(dim, -1).contiguous()
    embedding.num_channels = len(chosen)
    embedding.proj = torch.nn.Linear(picked.shape[1], dim, bias=False)
    with torch.no_grad():
        embedding.proj.weight.copy_(picked)
