"""Ray Data scale-out on a local 2-CPU cluster (one per session: Ray starts slowly): windows of one
scene over 2 actors, and several scenes over 2 actors, write the same bytes as local runs."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

pytest.importorskip("rasterio")
ray = pytest.importorskip("ray")

from tm_runtime.scene import RayExecutor, RuntimeFactory, SceneJob, TilingParams, embed_scene, run_scenes  # noqa: E402

from .fakes import fake_factory, s2_array, write_scene  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ray_cluster():
    # Workers import this checkout's tm_runtime and the test fakes.
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([path] if path else []))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()
        os.environ["PYTHONPATH"] = path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("ray") / "s2.tif", s2_array(208, 400, seed=21))  # 2 windows


def test_windows_over_two_actors_equal_local_bytes(ray_cluster, tiny_export, scene, tmp_path):
    factory = RuntimeFactory(str(tiny_export), threads=1)
    tiling = TilingParams(batch_size=1)
    local, distributed = tmp_path / "local.tif", tmp_path / "ray.tif"
    embed_scene(factory, {"S2L2A": scene}, local, tiling=tiling)
    summary = embed_scene(factory, {"S2L2A": scene}, distributed, tiling=tiling,
                          executor=RayExecutor(factory, actors=2))
    assert summary["executor"] == "ray" and summary["windows"]["batches"] == 2
    assert _sha(local) == _sha(distributed)


def test_scenes_over_two_actors_equal_local_bytes(ray_cluster, scene, tmp_path):
    other = write_scene(tmp_path / "other.tif", s2_array(150, 250, seed=22))
    jobs = []
    for where in ("local", "ray"):
        (tmp_path / where).mkdir()
        jobs.append([SceneJob("predict", {"S2L2A": str(src)}, str(tmp_path / where / f"{i}.tif"),
                              {"output": "logits"}, TilingParams(batch_size=3)) for i, src in enumerate([scene, other])]
                    + [SceneJob("predict", {"S2L2A": str(tmp_path / "missing.tif")}, str(tmp_path / where / "x.tif"))])
    local = run_scenes(jobs[0], fake_factory)
    distributed = run_scenes(jobs[1], fake_factory, RayExecutor(fake_factory, actors=2))
    assert [r["ok"] for r in local] == [r["ok"] for r in distributed] == [True, True, False]
    assert "no such file" in distributed[2]["error"] and not (tmp_path / "ray" / "x.tif").exists()
    for i in range(2):
        assert _sha(tmp_path / "local" / f"{i}.tif") == _sha(tmp_path / "ray" / f"{i}.tif")
