"""Synthetic georeferenced scenes shared by the scene tests (modules that need rasterio skip without it)."""
from __future__ import annotations

import pytest

from .fakes import s2_array, write_scene


@pytest.fixture(scope="session")
def s2_scene(tmp_path_factory):
    """A 600 x 700 px S2L2A scene (EPSG:32632, 10 m), tiled and compressed, and its array."""
    pytest.importorskip("rasterio", reason="scene I/O needs rasterio: pip install 'tm-deploy[geo]'")
    array = s2_array(600, 700, seed=1)
    path = write_scene(tmp_path_factory.mktemp("scenes") / "s2.tif", array)
    return path, array
