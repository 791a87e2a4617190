"""tm_runtime must never import torch or tm_export: checked in its sources and in a live process."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tm_runtime

FORBIDDEN = {"torch", "tm_export", "terratorch", "torchvision"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__"):
            names |= {a.value.split(".")[0] for a in node.args if isinstance(a, ast.Constant)}
    return names


def test_runtime_sources_do_not_import_torch():
    root = Path(tm_runtime.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) >= 5
    offenders = {str(f.relative_to(root)): imported_modules(f) & FORBIDDEN for f in files}
    assert not {k: v for k, v in offenders.items() if v}


@pytest.mark.parametrize("backend", ["ort", "openvino"])
def test_embed_runs_without_torch_loaded(tiny_export, backend):
    """embed on the default and the OpenVINO backend never pulls in torch or tm_export."""
    if backend == "openvino":
        pytest.importorskip("openvino")
    options = "{'cache_dir': None}" if backend == "openvino" else "{}"
    code = (
        "import sys, numpy as np\n"
        "from tm_runtime import TerraMindRuntime\n"
        f"rt = TerraMindRuntime({str(tiny_export)!r}, backend={backend!r}, backend_options={options})\n"
        "out = rt.embed({'S2L2A': np.zeros((1, 12, 224, 224), np.float32), 'S1GRD': np.zeros((1, 2, 224, 224), np.float32)})\n"
        "assert out.shape == (1, 196, 192), out.shape\n"
        "bad = sorted(m for m, mod in sys.modules.items() if mod is not None and m.split('.')[0] in ('torch', 'tm_export', 'terratorch'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    # Make torch unimportable too, so a lazy import anywhere would fail loudly.
    blocker = "import sys; sys.modules['torch'] = None; sys.modules['tm_export'] = None\n"
    result = subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")
