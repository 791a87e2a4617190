"""Shared fixtures: one tiny random-init export per test session (a few seconds)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

TINY_MODALITIES = ["S2L2A", "S1GRD", "DEM"]
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "terramesh_examples"


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (scripts/test.sh runs two workers): keep each file on one worker, so its
    module- and session-scoped exports are built once, and put every ``big_memory`` test on the
    same worker, so that two exports near 10 GB never run at once on a 24 GB machine."""
    if not hasattr(config, "workerinput") and config.getoption("dist", "no") == "no":
        return
    for item in items:
        group = "big_memory" if item.get_closest_marker("big_memory") else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    from tm_export.export import ExportConfig, export

    out = tmp_path_factory.mktemp("exports") / "tiny"
    export(ExportConfig(size="tiny", modalities=TINY_MODALITIES, out=out, random_init=True, seed=7), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def small_generate_export(tmp_path_factory) -> Path:
    """tiny, S2L2A+S1GRD -> DEM, shrunken random tokenizers, unvalidated: for planning and backend tests."""
    from tm_export.export import ExportConfig, export

    out = tmp_path_factory.mktemp("exports") / "tiny_gen"
    export(ExportConfig(size="tiny", modalities=["S2L2A", "S1GRD"], output_modalities=["DEM"], out=out,
                        random_init=True, tokenizer_size="small", validate=False), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def two_output_export(tmp_path_factory) -> Path:
    """tiny, S2L2A -> S1GRD + LULC (a diffusion and a ViT target), shrunken random tokenizers, unvalidated."""
    from tm_export.export import ExportConfig, export

    out = tmp_path_factory.mktemp("exports") / "tiny_two_outputs"
    export(ExportConfig(size="tiny", modalities=["S2L2A"], output_modalities=["S1GRD", "LULC"], out=out,
                        random_init=True, tokenizer_size="small", validate=False), log=lambda s: None)
    return out


@pytest.fixture(scope="session")
def floods_tiny(tmp_path_factory):
    """The official tiny sen1floods11 task config as is (S2L1C + S1GRD, mean merge), every tensor
    random, from a terratorch-written checkpoint, exported once (graphs validated): shared by the
    task tests and the scene tests (tests/task/conftest.py: make_case)."""
    from tests.task.conftest import make_case

    return make_case(tmp_path_factory, "sen1floods11_tiny", None, seed=11)


@pytest.fixture(scope="session")
def crop_tiny(tmp_path_factory):
    """The official multitemporal crop config with a tiny backbone: temporal wrapper, 3 dates
    concatenated, 13 classes (task tests and the scene tests)."""
    from tests.task.conftest import make_case

    return make_case(tmp_path_factory, "multitemporal_crop_base", "terramind_v1_tiny", seed=13, validate=False)


@pytest.fixture(scope="session")
def tiny_reference():
    from tm_export.export import ExportConfig, build_reference

    model, _ = build_reference(ExportConfig(size="tiny", modalities=TINY_MODALITIES, out=Path("unused"),
                                            random_init=True, seed=7), log=lambda s: None)
    return model


def random_inputs(batch: int = 2, seed: int = 0, modalities=TINY_MODALITIES) -> dict[str, np.ndarray]:
    from tm_runtime.modalities import get_modality

    rng = np.random.default_rng(seed)
    return {m: rng.standard_normal((batch, get_modality(m).num_channels, 224, 224)).astype(np.float32)
            for m in modalities}
