"""Coordinates on the host: [lon, lat] <-> text <-> ids, and the autoregressive decoding loop.

The coords "tokenizer" is a Hugging Face ``tokenizers`` JSON file that the export copies next to
its graphs; it is read with the ``tokenizers`` package (Rust, no torch: ``pip install
'tm-deploy[coords]'``), imported only when an export has coords. Text format, grid snapping,
sentinel merging and the text parsing follow terratorch's CoordsTokenizer and GenerationSampler.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .modalities import COORDS
from .sampling import sample_tokens

COORDS_TOKENIZER_FILE = "coords_tokenizer.json"
SENTINEL_PREFIX = "[S_"
# Additive attention bias for masked positions. Upstream masks with -finfo(float32).max; any value
# that drives exp() to exactly 0 in fp32 is equivalent, and this one also survives fp16.
MASKED_BIAS = -1.0e4


def causal_bias(length: int) -> np.ndarray:
    """(L, L) float32 self-attention bias of the shared decoder graph for a coords sequence:
    0 on and below the diagonal, MASKED_BIAS above it (future tokens)."""
    return np.triu(np.full((length, length), MASKED_BIAS, dtype=np.float32), k=1)


def check_coords(value: object) -> np.ndarray:
    """(B, 2) [lon, lat] in degrees as a float array, or an error naming what is wrong."""
    if not isinstance(value, np.ndarray):
        raise TypeError(f"coords: expected a numpy.ndarray of shape (batch, 2) with [lon, lat], "
                        f"got {type(value).__name__}")
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise TypeError(f"coords: expected a float array of [lon, lat] degrees, got dtype {value.dtype}")
    if value.ndim != 2 or value.shape[1] != 2 or value.shape[0] < 1:
        raise ValueError(f"coords: expected shape (batch, 2) with [lon, lat] per row, got {tuple(value.shape)}")
    array = value if np.issubdtype(value.dtype, np.floating) else value.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError("coords: contains NaN or Inf")
    lon, lat = array[:, 0], array[:, 1]
    if np.abs(lon).max() > 180 or np.abs(lat).max() > 90:
        raise ValueError(f"coords: expected [lon, lat] with lon in [-180, 180] and lat in [-90, 90], got lon in "
                         f"[{lon.min():g}, {lon.max():g}], lat in [{lat.min():g}, {lat.max():g}] "
                         "(are lon and lat swapped?)")
    return array


def coords_text(lonlat: np.ndarray, grid: float = COORDS.grid_degrees) -> list[str]:
    """Snap to the grid (round half to even, in the array's own dtype, as torch.round does) and
    format each row as upstream does, e.g. 'lat=47.25 lon=8.50 [EOS]'."""
    steps = 1.0 / grid
    snapped = np.round(lonlat * steps) / steps
    return [f"lat={float(lat):.2f} lon={float(lon):.2f} [EOS]" for lon, lat in snapped]


def merge_span(generated: list[int], start_id: int, sentinels: set[int]) -> list[int]:
    """The ids the decoder wrote for the [S_1] span: everything after the first [S_1] up to the
    next sentinel (upstream's merge_span_masking with the one-sentinel input [S_1])."""
    span: list[int] = []
    current = None
    for token in generated:
        if token in sentinels:
            current = token
        elif current == start_id:
            span.append(token)
    return span


def parse_coords(text: str) -> tuple[float, float]:
    """'lat=47.25 lon=8.50' -> (lon, lat); ValueError when the text is not of that form."""
    lat, lon = text.split(" ")
    return float(lon.strip("lon=")), float(lat.strip("lat="))


class CoordsTokenizer:
    """The export's coords tokenizer file, with the special ids TerraMind v1 relies on checked."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ImportError("coords need the 'tokenizers' package (no torch): pip install 'tm-deploy[coords]' "
                              "or pip install tokenizers") from exc
        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise ValueError(f"{self.path} is not a Hugging Face tokenizers file: {exc}") from exc
        vocab = self._tok.get_vocab()
        expected = {"[EOS]": COORDS.eos_id, "[S_1]": COORDS.start_id, "[S_2]": COORDS.end_id}
        wrong = {t: vocab.get(t) for t, i in expected.items() if vocab.get(t) != i}
        if wrong or "[PAD]" not in vocab:
            got = ", ".join(f"{t} -> {i}" for t, i in wrong.items()) or "[PAD] missing"
            raise ValueError(f"{self.path} does not fit TerraMind v1's coords vocabulary ({got}; expected "
                             "[EOS] -> 3, [S_1] -> 5, [S_2] -> 6 and a [PAD] token)")
        self.pad_id = vocab["[PAD]"]
        self.sentinels = {i for t, i in vocab.items() if t.startswith(SENTINEL_PREFIX)}

    def encode(self, lonlat: np.ndarray) -> np.ndarray:
        """(B, 2) [lon, lat] -> ids (B, L) int64, L = 3 for a vocabulary with one token per value."""
        rows = [e.ids for e in self._tok.encode_batch(coords_text(check_coords(lonlat)), add_special_tokens=True)]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise ValueError(f"coords: rows tokenised to different lengths {lengths} (a value outside the "
                             f"tokenizer's vocabulary?): {coords_text(lonlat)}")
        return np.asarray(rows, dtype=np.int64)

    def merge(self, generated: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """Decoder output rows ([S_1], t1, t2, ...) -> the generated span per row, right-padded
        with [PAD] to the longest row, (B, L) int64 (L may be 0), and each row's span length
        (a generated id may equal the pad id, so the lengths are not recoverable from the ids)."""
        spans = [merge_span([int(t) for t in row], COORDS.start_id, self.sentinels) for row in generated]
        length = max(len(s) for s in spans)
        out = np.full((len(spans), length), self.pad_id, dtype=np.int64)
        for i, span in enumerate(spans):
            out[i, : len(span)] = span
        return out, [len(s) for s in spans]

    def decode(self, ids: np.ndarray) -> np.ndarray:
        """Merged ids (B, L) -> (B, 2) float64 [lon, lat], read from each row's first two tokens;
        NaN (with a warning) for a row that does not spell coordinates, as upstream."""
        out = np.full((len(ids), 2), np.nan)
        for i, row in enumerate(np.asarray(ids)):
            text = self._tok.decode([int(t) for t in row[:2]], skip_special_tokens=False)
            try:
                out[i] = parse_coords(text)
            except ValueError:
                warnings.warn(f"coords: row {i} did not decode to coordinates (generated text {text!r}); "
                              "returning NaN", stacklevel=2)
        return out


def autoregressive_decode(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    batch: int,
    rng: np.random.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_new_tokens: int = COORDS.max_length - 1,
    start_id: int = COORDS.start_id,
    end_id: int = COORDS.end_id,
    progress: Callable[[str, int, int], None] | None = None,
) -> np.ndarray:
    """Greedy or sampled decoding from [S_1]: ``logits_fn(ids (B, L)) -> logits (B, L, V)`` is the
    causal decoder; one token per step for every row, until every row holds ``end_id`` or
    ``max_new_tokens`` were written. Returns (B, 1 + steps) int64, [S_1] first."""
    out = np.full((batch, 1), start_id, dtype=np.int64)
    for step in range(max_new_tokens):
        last = logits_fn(out)[:, -1]
        token = sample_tokens(last, rng, temperature=temperature, top_k=top_k, top_p=top_p)
        out = np.concatenate([out, token.reshape(batch, 1)], axis=1)
        if progress:
            progress("coords tokens", step + 1, max_new_tokens)
        if (out == end_id).any(axis=1).all():
            break
    return out
