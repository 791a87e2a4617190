"""The core runtime stays numpy + onnxruntime: rasterio and Ray load only with the scene I/O."""
from __future__ import annotations

import subprocess
import sys


def test_core_runtime_and_tiling_do_not_import_rasterio_or_ray():
    code = ("import sys\n"
            "import tm_runtime, tm_runtime.scene\n"
            "from tm_runtime.scene import tiled_inference, TilingParams\n"
            "from tm_runtime.scene.accumulate import BandAccumulator\n"
            "import numpy as np\n"
            "out = tiled_inference(lambda x: x[:, :1] * 2, np.ones((2, 300, 260), np.float32))\n"
            "assert out.shape == (1, 300, 260) and np.allclose(out, 2)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('rasterio', 'ray', 'torch', 'osgeo'))\n"
            "assert not bad, bad\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
