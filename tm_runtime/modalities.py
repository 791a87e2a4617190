"""The modality table: user names, internal checkpoint keys, channels, band names, statistics.

Pure data and lookups, shared by the exporter and the runtime (so it must stay numpy-only).
Statistics are TerraMind v1's pretraining mean/std, applied as ``(x - mean) / std``.
"""
from __future__ import annotations

from dataclasses import dataclass

S2L2A_BANDS = (
    "COASTAL_AEROSOL", "BLUE", "GREEN", "RED", "RED_EDGE_1", "RED_EDGE_2", "RED_EDGE_3",
    "NIR_BROAD", "NIR_NARROW", "WATER_VAPOR", "SWIR_1", "SWIR_2",
)
# S2L1C keeps the cirrus band (B10), which atmospheric correction removes from L2A.
S2L1C_BANDS = S2L2A_BANDS[:10] + ("CIRRUS",) + S2L2A_BANDS[10:]


@dataclass(frozen=True)
class Modality:
    """One raw image modality as the encoder sees it."""

    name: str  # the user-facing name, terratorch's spelling
    key: str  # the internal key used in the checkpoint (``encoder_embeddings.<key>.*``)
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Tokenised inputs (LULC, NDVI) go through their tokenizer's encoder, then a token embedding.
    tokenized: bool = False

    @property
    def num_channels(self) -> int:
        return len(self.bands)


RAW_MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality(
            "S2L2A", "untok_sen2l2a@224", S2L2A_BANDS,
            (1390.458, 1503.317, 1718.197, 1853.91, 2199.1, 2779.975, 2987.011, 3083.234,
             3132.22, 3162.988, 2424.884, 1857.648),
            (2106.761, 2141.107, 2038.973, 2134.138, 2085.321, 1889.926, 1820.257, 1871.918,
             1753.829, 1797.379, 1434.261, 1334.311),
        ),
        Modality(
            "S2L1C", "untok_sen2l1c@224", S2L1C_BANDS,
            (2357.089, 2137.385, 2018.788, 2082.986, 2295.651, 2854.537, 3122.849, 3040.56,
             3306.481, 1473.847, 506.07, 2472.825, 1838.929),
            (1624.683, 1675.806, 1557.708, 1833.702, 1823.738, 1733.977, 1732.131, 1679.732,
             1727.26, 1024.687, 442.165, 1331.411, 1160.419),
        ),
        Modality("RGB", "untok_sen2rgb@224", ("RED", "GREEN", "BLUE"),
                 (87.271, 80.931, 66.667), (58.767, 47.663, 42.631)),
        Modality("S1GRD", "untok_sen1grd@224", ("VV", "VH"), (-12.599, -20.293), (5.195, 5.890)),
        Modality("S1RTC", "untok_sen1rtc@224", ("VV", "VH"), (-10.93, -17.329), (4.391, 4.459)),
        Modality("DEM", "untok_dem@224", ("DEM",), (670.665,), (951.272,)),
    )
}

# Inputs that TerraMind reads as tokens of their own tokenizer. LULC's tokenizer takes a one-hot
# map of 10 classes (a class map is one-hot encoded first); statistics are identity for LULC.
TOKENIZED_MODALITIES: dict[str, Modality] = {
    "LULC": Modality("LULC", "tok_lulc@224", tuple(f"CLASS_{i}" for i in range(10)), (0.0,) * 10, (1.0,) * 10,
                     tokenized=True),
    "NDVI": Modality("NDVI", "tok_ndvi@224", ("NDVI",), (0.327,), (0.322,), tokenized=True),
}
INPUT_MODALITIES: dict[str, Modality] = {**RAW_MODALITIES, **TOKENIZED_MODALITIES}

# Spellings terratorch accepts for the same modality (it lower-cases and matches substrings).
_ALIASES = {
    "lulc": "LULC", "tok_lulc@224": "LULC", "ndvi": "NDVI", "tok_ndvi@224": "NDVI",
    "s2l2a": "S2L2A", "sen2l2a": "S2L2A", "untok_sen2l2a@224": "S2L2A",
    "s2l1c": "S2L1C", "sen2l1c": "S2L1C", "untok_sen2l1c@224": "S2L1C",
    "rgb": "RGB", "s2rgb": "RGB", "sen2rgb": "RGB", "untok_sen2rgb@224": "RGB",
    "s1grd": "S1GRD", "sen1grd": "S1GRD", "untok_sen1grd@224": "S1GRD",
    "s1rtc": "S1RTC", "sen1rtc": "S1RTC", "untok_sen1rtc@224": "S1RTC",
    "dem": "DEM", "untok_dem@224": "DEM",
}


def canonical_name(name: str) -> str:
    """Map a user spelling (``s2l2a``, ``S2RGB``, ``untok_dem@224``) to the canonical name."""
    if not isinstance(name, str):
        raise TypeError(f"modality names must be strings, got {type(name).__name__}")
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        known = ", ".join([*INPUT_MODALITIES, "coords"])
        raise ValueError(f"unknown modality {name!r}; known input modalities: {known}") from None


def get_modality(name: str) -> Modality:
    return INPUT_MODALITIES[canonical_name(name)]


# ---- generation targets (decoder heads; their tokens decode through the modality's tokenizer) ----
IMAGE_FSQ_LEVELS = (8, 8, 8, 6, 5)  # vocabulary 15360
LULC_FSQ_LEVELS = (7, 5, 5, 5, 5)  # vocabulary 4375


@dataclass(frozen=True)
class Target:
    """A modality TerraMind can generate: its decoder key, tokenizer and output statistics."""

    name: str
    key: str  # ``decoder_embeddings.<key>.*`` and the tokenizer's internal name
    num_channels: int
    fsq_levels: tuple[int, ...]
    decoder: str  # "diffusion" (FSQ-VAE with a UNet decoder) or "vit" (LULC: one pass, class logits)
    mean: tuple[float, ...]  # outputs are de-standardised with these (tok_* statistics)
    std: tuple[float, ...]

    @property
    def vocab_size(self) -> int:
        size = 1
        for level in self.fsq_levels:
            size *= level
        return size


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("S2L2A", "tok_sen2l2a@224", 12, IMAGE_FSQ_LEVELS, "diffusion",
               RAW_MODALITIES["S2L2A"].mean, RAW_MODALITIES["S2L2A"].std),
        Target("S1GRD", "tok_sen1grd@224", 2, IMAGE_FSQ_LEVELS, "diffusion",
               RAW_MODALITIES["S1GRD"].mean, RAW_MODALITIES["S1GRD"].std),
        Target("S1RTC", "tok_sen1rtc@224", 2, IMAGE_FSQ_LEVELS, "diffusion",
               RAW_MODALITIES["S1RTC"].mean, RAW_MODALITIES["S1RTC"].std),
        Target("DEM", "tok_dem@224", 1, IMAGE_FSQ_LEVELS, "diffusion",
               RAW_MODALITIES["DEM"].mean, RAW_MODALITIES["DEM"].std),
        Target("NDVI", "tok_ndvi@224", 1, IMAGE_FSQ_LEVELS, "diffusion", (0.327,), (0.322,)),
        Target("LULC", "tok_lulc@224", 10, LULC_FSQ_LEVELS, "vit", (0.0,) * 10, (1.0,) * 10),
    )
}

_TARGET_ALIASES = {"s2l2a": "S2L2A", "s2": "S2L2A", "s2l1c": "S2L2A", "s2rgb": "S2L2A", "sen2l2a": "S2L2A",
                   "s1grd": "S1GRD", "s1": "S1GRD", "s1rtc": "S1RTC", "dem": "DEM", "ndvi": "NDVI", "lulc": "LULC"}


def get_target(name: str) -> Target:
    """Output modality by user name; like upstream, any Sentinel-2 spelling generates S2L2A tokens."""
    if not isinstance(name, str):
        raise TypeError(f"output modality names must be strings, got {type(name).__name__}")
    key = _TARGET_ALIASES.get(name.lower())
    if key is None:
        raise ValueError(f"unknown output modality {name!r}; TerraMind generates {', '.join([*TARGETS, 'coords'])}")
    return TARGETS[key]


# ---- coordinates: a sequence modality (input and output), tokenised on the host ----
@dataclass(frozen=True)
class SequenceModality:
    """Geographic coordinates, TerraMind's one sequence modality in v1.

    An input (B, 2) array of [lon, lat] is snapped to the 0.25 degree grid and written as the text
    ``"lat={lat:.2f} lon={lon:.2f} [EOS]"``, which the coords tokenizer file (Hugging Face
    ``tokenizers`` JSON) turns into ids. As an output, the decoder writes the sequence token by
    token after the sentinel [S_1] until it emits [S_2] or fills ``max_length - 1`` slots; the
    ids below are those TerraMind v1 was trained with (upstream hard-codes them too).
    """

    name: str = "coords"
    key: str = "coords"
    vocab_size: int = 30_000
    max_length: int = 4  # decoder slots: [S_1] + up to three generated tokens
    eos_id: int = 3  # [EOS], ends an input sequence
    start_id: int = 5  # [S_1], the first decoder input
    end_id: int = 6  # [S_2], ends generation
    grid_degrees: float = 0.25


COORDS = SequenceModality()
_COORDS_ALIASES = ("coords", "coordinates", "location")


def is_coords(name: object) -> bool:
    """Whether a user name means the coordinates modality (terratorch maps 'location' to coords)."""
    return isinstance(name, str) and name.lower() in _COORDS_ALIASES
