"""Engine cache: a TensorRT plan is only valid for the ONNX graph, TensorRT version, GPU, precision,
optimisation profile and workspace it was built with, so the cache key is a sha256 over exactly
those parts. Layout::

    DIR/engines/<graph>/<key>.plan   the serialised engine
    DIR/engines/<graph>/<key>.json   sidecar: the key's parts, the plan's sha256, build facts

A lookup recomputes the key; when no plan matches it explains why (which part changed against
the newest cached engine of that graph), so a rebuild is never a mystery.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

KEY_VERSION = 1  # bump when the meaning of a part changes, to invalidate every cached engine

# Human names for the parts, used in rebuild reasons.
PART_LABELS: dict[str, str] = {
    "graph": "graph name",
    "onnx_sha256": "ONNX graph (sha256 in the manifest)",
    "external_data_sha256": "ONNX external weights (sha256 in the manifest)",
    "tensorrt_version": "TensorRT version",
    "gpu_name": "GPU",
    "compute_capability": "GPU compute capability",
    "precision": "precision",
    "profile": "optimisation profile (min/opt/max shapes)",
    "workspace_bytes": "builder workspace limit",
    "builder_options": "builder options",
    "key_version": "cache key format",
}

Shape = tuple[int, ...]
ProfileShapes = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


@dataclass(frozen=True)
class EngineKeyParts:
    """Everything an engine depends on. ``profile`` maps each input to its (min, opt, max) shapes."""

    graph: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"
    precision: str
    profile: ProfileShapes
    workspace_bytes: int | None
    external_data_sha256: tuple[str, ...] = ()
    builder_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"optimization_level": 3}
    key_version: int = KEY_VERSION

    def to_json(self) -> dict[str, Any]:
        """Canonical JSON form: shapes as lists, inputs sorted, so equal parts give equal bytes."""
        d = asdict(self)
        d["profile"] = {name: [list(map(int, s)) for s in shapes] for name, shapes in sorted(self.profile.items())}
        d["external_data_sha256"] = list(self.external_data_sha256)
        d["builder_options"] = dict(sorted(self.builder_options.items()))
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EngineKeyParts":
        profile = {n: tuple(tuple(int(x) for x in s) for s in shapes) for n, shapes in d["profile"].items()}
        return cls(graph=d["graph"], onnx_sha256=d["onnx_sha256"], tensorrt_version=d["tensorrt_version"],
                   gpu_name=d["gpu_name"], compute_capability=d["compute_capability"], precision=d["precision"],
                   profile=profile, workspace_bytes=d["workspace_bytes"],
                   external_data_sha256=tuple(d.get("external_data_sha256", ())),
                   builder_options=dict(d.get("builder_options", {})), key_version=int(d.get("key_version", 0)))

    @property
    def key(self) -> str:
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _fmt(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a sha256
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) and len(v) == 64 for v in value):
        return "[" + ", ".join(v[:12] + "…" for v in value) + "]"
    return str(value)


def _profile_diff(old: dict[str, Any], new: dict[str, Any]) -> str:
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a != b:
            fmt = lambda s: "absent" if s is None else "/".join("x".join(map(str, d)) for d in s)  # noqa: E731
            changes.append(f"{name} {fmt(a)} → {fmt(b)}")
    return "; ".join(changes)


def changed_parts(old: EngineKeyParts, new: EngineKeyParts) -> list[str]:
    """Names of the parts that differ (in PART_LABELS order)."""
    a, b = old.to_json(), new.to_json()
    return [p for p in PART_LABELS if a.get(p) != b.get(p)]


def rebuild_reason(old: EngineKeyParts | None, new: EngineKeyParts) -> str:
    """Why an engine must be (re)built, in words: 'no engine cached' or each changed part with its
    old and new value, e.g. 'TensorRT version changed: 10.0.1 → 10.3.0'."""
    if old is None:
        return f"{new.graph}: no engine cached for this graph"
    parts = changed_parts(old, new)
    if not parts:
        return f"{new.graph}: cached engine is missing or unreadable"
    a, b = old.to_json(), new.to_json()
    lines = []
    for p in parts:
        if p == "profile":
            lines.append(f"{PART_LABELS[p]} changed: {_profile_diff(a[p], b[p])}")
        else:
            lines.append(f"{PART_LABELS[p]} changed: {_fmt(a.get(p))} → {_fmt(b.get(p))}")
    return f"{new.graph}: " + "; ".join(lines)


@dataclass(frozen=True)
class CacheLookup:
    """The result of ``EngineCache.lookup``: ``hit`` with the plan's path, or the rebuild reason."""

    parts: EngineKeyParts
    plan_path: Path
    hit: bool
    reason: str  # "" on a hit

    @property
    def key(self) -> str:
        return self.parts.key


def _atomic_write(path: Path, data: bytes) -> None:
    """Write beside the target, then rename: an interrupted build never leaves a half plan that a
    later lookup would take for a valid engine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EngineCache:
    """Plans under ``root/engines/<graph>/``; the sidecar JSON records the key's parts."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def graph_dir(self, graph: str) -> Path:
        return self.root / "engines" / graph

    def plan_path(self, parts: EngineKeyParts) -> Path:
        return self.graph_dir(parts.graph) / f"{parts.key}.plan"

    def sidecar_path(self, parts: EngineKeyParts) -> Path:
        return self.plan_path(parts).with_suffix(".json")

    def entries(self, graph: str) -> list[tuple[EngineKeyParts, dict[str, Any], Path]]:
        """Cached (parts, sidecar, sidecar path) of a graph, newest first; unreadable sidecars skipped."""
        out = []
        directory = self.graph_dir(graph)
        if not directory.is_dir():
            return out
        for side in directory.glob("*.json"):
            try:
                data = json.loads(side.read_text())
                out.append((EngineKeyParts.from_json(data["parts"]), data, side))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        out.sort(key=lambda e: e[1].get("created_unix", 0.0), reverse=True)
        return out

    def lookup(self, parts: EngineKeyParts, verify: bool = True) -> CacheLookup:
        """A hit needs the plan, its sidecar with the same parts and (``verify``) the plan's sha256."""
        plan, side = self.plan_path(parts), self.sidecar_path(parts)
        if plan.is_file() and side.is_file():
            try:
                data = json.loads(side.read_text())
                same = EngineKeyParts.from_json(data["parts"]) == parts
            except (OSError, ValueError, KeyError, TypeError):
                data, same = {}, False
            if same and (not verify or _sha256(plan) == data.get("plan_sha256")):
                return CacheLookup(parts, plan, True, "")
            if same:
                return CacheLookup(parts, plan, False,
                                   f"{parts.graph}: cached plan {plan.name} does not match its recorded sha256 "
                                   "(truncated or modified)")
        previous = next((p for p, _, _ in self.entries(parts.graph) if p != parts), None)
        return CacheLookup(parts, plan, False, rebuild_reason(previous, parts))

    def store(self, parts: EngineKeyParts, plan: bytes, extra: dict[str, Any] | None = None) -> Path:
        """Write the plan and its sidecar (plan first: a sidecar always describes a complete plan)."""
        import time

        path = self.plan_path(parts)
        _atomic_write(path, bytes(plan))
        sidecar = {"key": parts.key, "parts": parts.to_json(), "plan_sha256": hashlib.sha256(plan).hexdigest(),
                   "plan_bytes": len(plan), "created_unix": time.time(), **(extra or {})}
        _atomic_write(self.sidecar_path(parts), (json.dumps(sidecar, indent=2) + "\n").encode())
        return path

    def prune(self, graph: str, keep: set[str]) -> list[Path]:
        """Delete the graph's plans and sidecars whose key is not in ``keep``; returns what went."""
        removed = []
        directory = self.graph_dir(graph)
        if directory.is_dir():
            for f in sorted(directory.iterdir()):
                if f.suffix in (".plan", ".json") and f.stem not in keep:
                    f.unlink()
                    removed.append(f)
        return removed


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
