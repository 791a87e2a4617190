"""ONNX Runtime backend: one lazily created InferenceSession per graph (a graph that is never run,
e.g. a decoder in an embedding-only workload, is never read)."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


# backend_options of backend="ort" (TerraMindRuntime); both are on/off switches.
ORT_OPTIONS = ("lean_memory", "spinning")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def ort_options(options: Mapping[str, object]) -> dict[str, bool]:
    """``backend_options`` of backend="ort" checked and read as booleans. Strings are accepted
    because command lines pass them (``tm-run --backend-option spinning=true``): a plain
    ``bool("false")`` would turn an option on."""
    unknown = sorted(set(options) - set(ORT_OPTIONS))
    if unknown:
        raise ValueError(f"backend_options for backend='ort' are {', '.join(ORT_OPTIONS)}; got {', '.join(unknown)}")
    flags = {}
    for key in ORT_OPTIONS:
        value = options.get(key, False)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            value = value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise ValueError(f"backend option {key} must be true or false, got {value!r}")
        flags[key] = value
    return flags


def make_session_options(threads: int | None = None, profile_prefix: str | None = None,
                         spinning: bool = False, lean_memory: bool = False) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # Every graph has its own session and so its own intra-op pool. With ORT's default spinning,
    # the pool of the graph that just ran keeps its workers busy-waiting while the next graph
    # runs, and they take the cores it needs: on 2 cores the tiny encoder after the embed graphs
    # ran 2-4x slower than with spinning off (see BENCHMARKS.md). So spinning is off by default;
    # spinning=True lets the workers spin between the parallel sections of one run (no sleep and
    # wake-up per operator) and stops them at the end of the run, so no pool spins while another
    # graph runs. Where the runtime has the cores to itself that helps short operators (tiny embed
    # 17%, base predict ~3% on a 2-core Xeon; nothing on a slower AVX2 EPYC); beside another busy
    # process it costs 10% to 2x (BENCHMARKS.md, "Spinning within a run").
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    # Every session keeps a CPU arena as large as its biggest run, and pre-packed copies of its
    # weights: with many graphs loaded (large, six outputs: 26 sessions) that is ~1 GB over the
    # files (BENCHMARKS.md, "Memory: large"). lean_memory gives both back.
    if lean_memory:
        opts.enable_cpu_mem_arena = False
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return opts


class OrtBackend:
    """Creates sessions on first use; ``run`` is safe to call from several threads at once
    (InferenceSession.run is thread-safe; creation is guarded by a lock)."""

    def __init__(
        self,
        graph_paths: dict[str, Path],
        providers: Sequence[str | tuple[str, dict]] | None = None,
        threads: int | None = None,
        profile_prefix: str | None = None,
        spinning: bool = False,
        before_first_use: Callable[[str], None] | None = None,
        lean_memory: bool = False,
    ) -> None:
        self._paths = dict(graph_paths)
        self._before_first_use = before_first_use  # e.g. the sha256 check of the graph's files
        self._spinning = spinning
        self._lean_memory = lean_memory
        self._providers = list(providers) if providers else ["CPUExecutionProvider"]
        self._threads = threads
        self._profile_prefix = profile_prefix
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        self.session_seconds: dict[str, float] = {}

    def session(self, name: str) -> ort.InferenceSession:
        sess = self._sessions.get(name)
        if sess is not None:
            return sess
        with self._lock:
            sess = self._sessions.get(name)
            if sess is None:
                if self._before_first_use is not None:
                    self._before_first_use(name)
                start = time.perf_counter()
                sess = ort.InferenceSession(
                    str(self._paths[name]),
                    sess_options=make_session_options(self._threads, self._profile_prefix, self._spinning,
                                                      self._lean_memory),
                    providers=self._providers,
                )
                self.session_seconds[name] = time.perf_counter() - start
                self._sessions[name] = sess
        return sess

    def run(self, name: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.session(name).run(outputs, feeds)

    def end_profiling(self) -> list[str]:
        return [s.end_profiling() for s in self._sessions.values()]
