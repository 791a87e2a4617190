"""The export's memory bound: peak RSS <= 2 x the bytes it writes + 1.5 GB, for every export.

Measured in a fresh process (``tm-export`` itself, which records its peak in the manifest), on the
configuration that needed 7x its bytes before the weights stopped being copied: the Winograd UNet
and two outputs. With shrunken tokenizers the export is small, so the bound's 1.5 GB allowance
(the interpreter, torch and onnxruntime take ~0.6 GB of it) dominates; the tighter check on what
the export adds per graph is what catches a copy of the weights creeping back in.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tm_export import memory
from tm_export.export import ExportConfig, export

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9


def bound(export_bytes: int) -> float:
    return 2 * export_bytes + 1.5 * GB


@pytest.fixture(scope="module")
def winograd_export(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("memory") / "tiny_winograd"
    cmd = [sys.executable, "-m", "tm_export.cli", "--model", "tiny", "--modalities", "S2L2A",
           "--output-modalities", "S1GRD", "LULC", "--random-init", "--seed", "3", "--small-tokenizers",
           "--winograd", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["_stdout"] = run.stdout
    manifest["_bytes_on_disk"] = sum(p.stat().st_size for p in out.iterdir() if p.name != "manifest.json")
    return manifest


@pytest.mark.slow
def test_peak_rss_within_the_bound(winograd_export):
    v = winograd_export["validation"]
    assert v["passed"] and v["export_bytes"] == winograd_export["_bytes_on_disk"]
    peak = v["peak_rss_bytes"]
    assert 0.3 * GB < peak <= bound(v["export_bytes"]), (
        f"peak RSS {peak / GB:.2f} GB for {v['export_bytes'] / GB:.3f} GB written: over 2 x bytes + 1.5 GB")
    assert f"peak RSS {peak / GB:.2f} GB" in winograd_export["_stdout"].splitlines()[-1]


@pytest.mark.slow
def test_memory_profile_steps(tmp_path):
    """Step by step (``tm_export.memory``), in this process, one graph of each kind (the UNet in
    Winograd form): no step may hold more than its graph's bytes above where it started, and the
    weights once more at the very most while it runs (before, tracing, onnxslim and saving each
    took 2-6x). The allowance covers activations of the small validation batches."""
    log = memory.StepLog()
    with memory.recording(log):
        export(ExportConfig(size="tiny", modalities=["S1GRD"], output_modalities=["DEM"], out=tmp_path / "e",
                            random_init=True, seed=1, tokenizer_size="small", winograd=4), log=lambda s: None)
    sizes = {p.name.split(".")[0]: 0 for p in (tmp_path / "e").iterdir()}
    for p in (tmp_path / "e").iterdir():
        sizes[p.name.split(".")[0]] += p.stat().st_size
    allowance = 0.25 * GB
    steps = {(r.graph, r.step): r for r in log.records}
    assert {"trace", "simplify", "save", "validate"} <= {s for _, s in steps}
    for (graph, name), record in steps.items():
        if graph not in sizes or name == "validate":  # validate: runs the reference and a session
            continue
        assert record.cost <= sizes[graph] + allowance, (graph, name, record.cost, sizes[graph])
    for graph, size in sizes.items():
        if (graph, "validate") in steps:
            assert steps[(graph, "validate")].cost <= 2 * size + allowance, (graph, steps[(graph, "validate")].cost)
