"""Eager PyTorch reference of generation, consuming the same numpy Generator as the runtime.

The graphs' modules run in torch; the host-side steps (sampling, FSQ ids -> codes, DDIM) are the
runtime's numpy modules, so runtime vs reference isolates the exported graphs, draw for draw.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from tm_runtime.coords import CoordsTokenizer, autoregressive_decode
from tm_runtime.fsq import FSQ
from tm_runtime.generation import destandardize
from tm_runtime.modalities import COORDS, get_modality, get_target, is_coords
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
    coords_tokenizer: CoordsTokenizer | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Same contract and same Generator consumption as ``TerraMindRuntime.generate``.

    The encoder input is kept per batch row (rows differ once coords are generated) and every
    row runs on its own: simple, and independent of the runtime's grouping of equal rows.
    """
    batch = len(next(iter(inputs.values())))
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(batch)]  # per row: parts

    def add(tokens: torch.Tensor, emb: torch.Tensor, row: int | None = None) -> None:
        for b in range(batch) if row is None else [row]:
            rows[b].append((tokens[b:b + 1] if row is None else tokens, emb))

    for key, value in inputs.items():
        if is_coords(key):
            add(*model.coords_embedding(torch.from_numpy(coords_tokenizer.encode(value))))
            continue
        name = get_modality(key).name
        image = torch.from_numpy((_standardize(name, value) if standardize else value).astype(np.float32))
        add(model.embedding(name)(image), model.embedding(name).position_embedding(image))
    names = [COORDS.name if is_coords(m) else get_target(m).name for m in output_modalities]
    pending = None
    if chained and COORDS.name in names[:-1]:  # upstream's [S_1] of a coords output still to come
        pending = len(rows[0])
        add(*model.coords_embedding(torch.full((batch, 1), COORDS.start_id)))

    def per_row(fn) -> np.ndarray:
        outs = []
        for b, parts in enumerate(rows):
            context = torch.cat([t for t, _ in parts], dim=1)
            emb = torch.cat([e for _, e in parts], dim=1)
            outs.append(fn(b, model.encode(context)[-1], emb))
        return np.concatenate(outs, axis=0)

    out, tokens = {}, {}
    grid = model.grid
    for i, name in enumerate(names):
        feed_back = chained and i < len(names) - 1
        if name == COORDS.name:
            def logits_fn(ids: np.ndarray) -> np.ndarray:
                return per_row(lambda b, enc, emb: model.coords_logits(enc, emb, torch.from_numpy(ids[b:b + 1])).numpy())

            generated = autoregressive_decode(logits_fn, batch, rng, temperature, top_k, top_p)
            ids, lengths = coords_tokenizer.merge(generated)
            tokens[name], out[name] = ids, coords_tokenizer.decode(ids)
            if feed_back:
                for b, n in enumerate(lengths):
                    del rows[b][pending]
                    if n:
                        rows[b].insert(pending, model.coords_embedding(torch.from_numpy(ids[b:b + 1, :n])))
            continue
        logits = per_row(lambda b, enc, emb: model.target_logits(enc, emb, name).numpy())
        ids = sample_tokens(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
        ids = ids.reshape(ids.shape[0], grid, grid)
        tokens[name] = ids
        if feed_back:  # the output conditions the next ones, as an encoder input
            add(*model.token_embedding(name)(torch.from_numpy(ids)))
        tok = tokenizers[name]
        noise = None
        if isinstance(tok.decoder, UNetStep):
            size = model.image_size
            noise = rng.standard_normal((ids.shape[0], tok.config.in_channels, size, size), dtype=np.float32)
        image = reference_decode(tok, ids, timesteps, noise)
        target = get_target(name)
        out[name] = destandardize(image, target.mean, target.std) if standardize else image
    return out, tokens
