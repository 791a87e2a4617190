"""Fixtures of the OpenVINO / reduced-precision tests: one tiny export with every kind of graph
(patch, token and coords embeddings, encoder, image and coords decoders, tokenizer encoders, a
diffusion UNet and the LULC ViT decoder), shrunken random tokenizers, unvalidated (the graphs are
validated by the main suite; here two engines are compared on the same files)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DATA_DIR

ALL_KINDS_INPUTS = ["S2L2A"]
# coords first: its generated tokens condition DEM and LULC through the coords embedding graph.
ALL_KINDS_OUTPUTS = ["coords", "DEM", "LULC"]


def has_tiles() -> bool:
    return (DATA_DIR / "S2L2A").is_dir() and any((DATA_DIR / "S2L2A").glob("*.tif"))


@pytest.fixture(scope="session")
def coords_vocab(tmp_path_factory) -> Path:
    pytest.importorskip("tokenizers", reason="the coords tokenizer file is read with Hugging Face tokenizers")
    from tests.coords_vocab import write_coords_tokenizer

    return write_coords_tokenizer(tmp_path_factory.mktemp("ov_vocab") / "coords_tokenizer.json")


@pytest.fixture(scope="session")
def all_kinds_export(tmp_path_factory, coords_vocab) -> Path:
    from tm_export.export import ExportConfig, export

    out = tmp_path_factory.mktemp("ov_exports") / "all_kinds"
    export(ExportConfig(size="tiny", modalities=ALL_KINDS_INPUTS, output_modalities=ALL_KINDS_OUTPUTS, out=out,
                        random_init=True, seed=11, tokenizer_size="small", validate=False,
                        tokenizer_ckpts={"coords": coords_vocab}), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def ov_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ov_cache")
