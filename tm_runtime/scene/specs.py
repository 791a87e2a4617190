"""Small shared facts of scene I/O: what an input modality needs, class names and colours. Pure data."""
from __future__ import annotations

from dataclasses import dataclass

CLASS_MAP_MODALITIES = ("LULC",)

# TerraMind's LULC is the ESRI 10 m land-cover map with its classes renumbered 0..9 (upstream's code
# does not spell the order out; this is the order of the ESRI legend, 0 = no data). The colours are
# the colour-blind-safe palette of upstream's plotting utilities, one per class id.
LULC_CLASS_NAMES = ("no data", "water", "trees", "flooded vegetation", "crops", "built area", "bare ground",
                    "snow/ice", "clouds", "rangeland")
LULC_COLORS = ((0x00, 0x00, 0x00), (0x31, 0x71, 0xAD), (0x46, 0x9C, 0x76), (0x83, 0xCA, 0x70), (0xEA, 0xE1, 0x59),
               (0xC0, 0x7C, 0xB8), (0xC1, 0x93, 0x68), (0x6F, 0xB2, 0xE4), (0xF1, 0xF1, 0xF1), (0xC6, 0x65, 0x26))

# Distinct colours for task classes without a palette of their own (cycled beyond 12).
_TASK_COLORS = ((0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E), (0x2C, 0xA0, 0x2C), (0xD6, 0x27, 0x28), (0x94, 0x67, 0xBD),
                (0x8C, 0x56, 0x4B), (0xE3, 0x77, 0xC2), (0x7F, 0x7F, 0x7F), (0xBC, 0xBD, 0x22), (0x17, 0xBE, 0xCF),
                (0xAE, 0xC7, 0xE8), (0xFF, 0xBB, 0x78))


def class_colors(count: int) -> tuple[tuple[int, int, int], ...]:
    return tuple(_TASK_COLORS[i % len(_TASK_COLORS)] for i in range(count))


@dataclass(frozen=True)
class ModalitySpec:
    """What the model wants of one input modality: band names (in order), the modality's complete
    band list (to pick a subset from a file holding all of them) and the fill for nodata pixels
    (per band; per band and date for a temporal model with per-date statistics)."""

    name: str
    bands: tuple[str, ...]
    full_bands: tuple[str, ...] = ()
    fill: tuple[float, ...] | None = None
    date_fill: tuple[tuple[float, ...], ...] | None = None  # per date, where statistics are per (band, date)

    def fill_of_date(self, t: int) -> tuple[float, ...] | None:
        if self.date_fill is None:
            return self.fill
        if not 0 <= t < len(self.date_fill):
            raise ValueError(f"{self.name}: date {t + 1} has no statistics (they are per date, for "
                             f"{len(self.date_fill)} dates)")
        return self.date_fill[t]

    @property
    def class_map(self) -> bool:
        return self.name in CLASS_MAP_MODALITIES

    @property
    def file_bands(self) -> int:
        """Bands the file must provide: class maps are one band of class ids."""
        return 1 if self.class_map else len(self.bands)
