"""What the numbers were measured on: CPU, cores, versions, memory, and the sgemm rate.

Torch-free: the sgemm rate here uses numpy (its BLAS); ``torch_side`` measures torch's.
"""
from __future__ import annotations

import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# CPU flags that decide which reduced-precision paths exist (lscpu / /proc/cpuinfo names).
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> dict[str, bool]:
    """Which of ``RELEVANT_FLAGS`` the CPU has (empty when /proc/cpuinfo is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return {f: f in present for f in RELEVANT_FLAGS}
    except OSError:
        pass
    return {}


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls: AVX512_BF16 or AMX-BF16 (torch's oneDNN and OpenVINO use either)."""
    flags = cpu_flags()
    return bool(flags.get("avx512_bf16") or flags.get("amx_bf16"))


def usable_cores() -> int:
    """Cores this process may run on (cgroup/affinity aware where the OS tells us)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _version(distribution: str) -> str | None:
    """Installed version without importing the package (terratorch has no ``__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def versions(include_torch: bool = False) -> dict[str, str | None]:
    """Library versions; torch / terratorch only when asked, since importing them is the cost
    (and the side effects) a torch-free run avoids."""
    from . import __version__

    out: dict[str, str | None] = {
        "tm_bench": __version__, "python": platform.python_version(),
        "numpy": np.__version__, "onnxruntime": _version("onnxruntime"),
    }
    if include_torch:
        out["torch"] = _version("torch")
        out["terratorch"] = _version("terratorch")
    return out


def machine_info() -> dict[str, object]:
    info: dict[str, object] = {
        "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "usable_cores": usable_cores(), "logical_cpus": os.cpu_count(),
        "platform": platform.platform(), "hostname": platform.node(),
    }
    try:
        info["loadavg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import psutil

        info["memory_total_bytes"] = psutil.virtual_memory().total
        info["physical_cores"] = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return info


# -- memory ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return None


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (Linux VmHWM, else getrusage)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if platform.system() == "Darwin" else peak * 1024  # bytes on macOS, KiB on Linux
    except ImportError:
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each phase gets its own peak.

    Returns False where that is not possible; the peak is then the process's lifetime peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- sgemm rate --------------------------------------------------------------------------------
@contextmanager
def blas_threads(threads: int) -> Iterator[bool]:
    """Limit numpy's BLAS to ``threads`` (threadpoolctl if installed); yields whether it could."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield False
        return
    with threadpool_limits(limits=threads, user_api="blas"):
        yield True


def numpy_sgemm_gflops(threads: int, n: int = 2048, repeats: int = 7) -> dict[str, object]:
    """Best-of-``repeats`` float32 (n x n) @ (n x n) rate with numpy, at ``threads`` BLAS threads.

    The best (not the median) run: the floor is meant to be what the hardware can do, and on a
    shared machine slow runs are other tenants, not the GEMM.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    with blas_threads(threads) as limited:
        rates = matmul_rates(lambda: np.matmul(a, b, out=out), n, repeats)
    return {"library": "numpy", "blas": _blas_name(), "n": n, "repeats": repeats, "threads": threads,
            "threads_limited": limited, **rates}


def matmul_rates(matmul: Callable[[], object], n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of an (n x n) @ (n x n) product: best and median of ``repeats`` timed calls after
    one warm-up call (thread pool start, page faults)."""
    matmul()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul()
        times.append(time.perf_counter() - start)
    flop = 2.0 * n ** 3
    return {"gflops_best": flop / min(times) / 1e9, "gflops_median": flop / sorted(times)[len(times) // 2] / 1e9}


def _blas_name() -> str:
    try:
        config = np.show_config(mode="dicts")  # numpy >= 1.25
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # older numpy or a layout change: the name is informative only
        return "unknown"


# ONNX Runtime's own GEMM (MLAS) rate. The one-node model is encoded by hand, so that the probe
# needs neither the onnx package nor torch (the runtime installs neither).
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):  # wire type 0: varint
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload  # wire type 2: bytes


def _float_matrix(name: str, n: int) -> bytes:
    """ValueInfoProto: name, TypeProto.tensor_type{elem_type FLOAT, shape [n, n]}."""
    dim = _field(1, _field(1, n))  # TensorShapeProto.dim { dim_value: n }
    tensor = _field(1, 1) + _field(2, dim + dim)
    return _field(1, name.encode()) + _field(2, _field(1, tensor))


def matmul_model_bytes(n: int) -> bytes:
    """ModelProto of C = MatMul(A, B) on float32 (n, n) inputs, opset 13, IR version 7."""
    node = _field(1, b"A") + _field(1, b"B") + _field(2, b"C") + _field(4, b"MatMul")
    graph = (_field(1, node) + _field(2, b"sgemm") + _field(11, _float_matrix("A", n))
             + _field(11, _float_matrix("B", n)) + _field(12, _float_matrix("C", n)))
    return _field(1, 7) + _field(7, graph) + _field(8, _field(2, 13))


def ort_sgemm_gflops(threads: int, n: int = 2048, repeats: int = 7) -> dict[str, object]:
    """Best-of float32 (n x n) MatMul rate of ONNX Runtime's CPU provider at ``threads``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(matmul_model_bytes(n), sess_options=opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"A": rng.standard_normal((n, n), dtype=np.float32), "B": rng.standard_normal((n, n), dtype=np.float32)}
    sess.run(None, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    flop = 2.0 * n ** 3
    return {"library": "onnxruntime (MLAS, CPUExecutionProvider)", "n": n, "repeats": repeats, "threads": threads,
            "gflops_best": flop / min(times) / 1e9, "gflops_median": flop / sorted(times)[len(times) // 2] / 1e9}
