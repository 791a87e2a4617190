"""Eager PyTorch reference of generation, consuming the same numpy Generator as the runtime.

The graphs' modules run in torch; the host-side steps (sampling, FSQ ids -> codes, DDIM) are the
runtime's numpy modules, so runtime vs reference isolates the exported graphs, draw for draw.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from tm_runtime.fsq import FSQ
from tm_runtime.generation import destandardize
from tm_runtime.modalities import get_modality, get_target
from tm_runtime.sampling import sample_tokens
from tm_runtime.scheduler import DDIMScheduler

from .terramind import TerraMindModel
from .tokenizers import Tokenizer, UNetStep


def _standardize(name: str, image: np.ndarray) -> np.ndarray:
    mod = get_modality(name)
    mean = np.asarray(mod.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(mod.std, np.float32).reshape(1, -1, 1, 1)
    return (image - mean) / std


@torch.no_grad()
def reference_decode(tok: Tokenizer, ids: np.ndarray, timesteps: int, noise: np.ndarray | None) -> np.ndarray:
    codes = torch.from_numpy(FSQ(tok.config.levels).indices_to_codes(ids))
    if not isinstance(tok.decoder, UNetStep):
        return tok.decoder(codes).numpy()
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(timesteps)
    x = noise
    for t in scheduler.timesteps:
        tt = torch.full((x.shape[0],), int(t), dtype=torch.int64)
        x0 = tok.decoder(torch.from_numpy(x), tt, codes).numpy()
        x = scheduler.step(x0, int(t), x)
    return x


@torch.no_grad()
def reference_generate(
    model: TerraMindModel,
    tokenizers: Mapping[str, Tokenizer],
    inputs: Mapping[str, np.ndarray],
    output_modalities: list[str],
    rng: np.random.Generator,
    timesteps: int = 10,
    temperature: float = 1.0,
    top_p: float = 0.8,
    top_k: int = 0,
    standardize: bool = True,
    chained: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Same contract and same Generator consumption as ``TerraMindRuntime.generate``."""
    arrays = {get_modality(k).name: (_standardize(k, v) if standardize else v).astype(np.float32)
              for k, v in inputs.items()}
    images = {k: torch.from_numpy(v) for k, v in arrays.items()}
    context = torch.cat([model.embedding(n)(img) for n, img in images.items()], dim=1)
    emb = torch.cat([model.embedding(n).position_embedding(img) for n, img in images.items()], dim=1)
    out, tokens = {}, {}
    grid = model.grid
    names = [get_target(m).name for m in output_modalities]
    for i, name in enumerate(names):
        encoded = model.encode(context)[-1]
        logits = model.target_logits(encoded, emb, name).numpy()
        ids = sample_tokens(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
        ids = ids.reshape(ids.shape[0], grid, grid)
        tokens[name] = ids
        if chained and i < len(names) - 1:  # the output conditions the next ones, as an encoder input
            t, e = model.token_embedding(name)(torch.from_numpy(ids))
            context, emb = torch.cat([context, t], dim=1), torch.cat([emb, e], dim=1)
        tok = tokenizers[name]
        noise = None
        if isinstance(tok.decoder, UNetStep):
            size = model.image_size
            noise = rng.standard_normal((ids.shape[0], tok.config.in_channels, size, size), dtype=np.float32)
        image = reference_decode(tok, ids, timesteps, noise)
        target = get_target(name)
        out[name] = destandardize(image, target.mean, target.std) if standardize else image
    return out, tokens
