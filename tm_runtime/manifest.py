"""The export directory contract: ``manifest.json`` schema, loading and sha256 verification.

The exporter writes it, the runtime reads it; nothing else passes between them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "tm-deploy-export"
# 2: one shared decoder graph plus per-target query and head graphs (1 had a whole decoder per target).
FORMAT_VERSION = 2


class ManifestError(RuntimeError):
    """The export directory is missing, malformed, of another format version, or corrupted."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]  # ints are fixed, strings are symbolic dims ("batch", "num_tokens")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class GraphEntry:
    name: str
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: tuple[dict[str, str], ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "GraphEntry":
        return cls(
            name=name,
            file=d["file"],
            sha256=d["sha256"],
            inputs=tuple(TensorSpec.from_json(t) for t in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(t) for t in d["outputs"]),
            external_data=tuple(d.get("external_data", ())),
            raw=d,
        )

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class ModalityEntry:
    name: str
    key: str
    graph: str
    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokenize_graph: str | None = None  # tokenised inputs: image -> ids, then ``graph`` embeds the ids

    @property
    def num_channels(self) -> int:
        return len(self.bands)

    @property
    def tokenized(self) -> bool:
        return self.tokenize_graph is not None


@dataclass(frozen=True)
class TargetEntry:
    """A generation target: its decoder query and head graphs (around the shared decoder), vocabulary,
    FSQ levels and output statistics."""

    name: str
    key: str
    query_graph: str  # positions -> the target's decoder queries (1, L, D)
    head_graph: str  # the shared decoder's hidden states -> logits (B, L, V)
    vocab_size: int
    fsq_levels: tuple[int, ...]
    tokenizer_decoder: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    condition_graph: str | None = None  # ids -> encoder tokens, to condition later outputs

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "TargetEntry":
        return cls(name, d["key"], d["query_graph"], d["head_graph"], int(d["vocab_size"]), tuple(d["fsq_levels"]),
                   d["tokenizer_decoder"], int(d["channels"]), tuple(d["mean"]), tuple(d["std"]),
                   d.get("condition_graph"))


@dataclass(frozen=True)
class CoordsEntry:
    """The coords sequence modality: as an input, an output, or both; its tokenizer file."""

    input: bool
    output: bool
    embed_graph: str | None  # ids -> encoder tokens (a coords input, or a chained coords output)
    query_graph: str | None  # output: ids so far -> decoder queries; the shared decoder runs them causally
    head_graph: str | None  # output: decoder hidden states -> logits
    tokenizer_file: str

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "CoordsEntry":
        return cls(bool(d["input"]), bool(d["output"]), d.get("embed_graph"), d.get("query_graph"),
                   d.get("head_graph"), d["tokenizer_file"])


@dataclass
class Manifest:
    directory: Path
    data: dict[str, Any]
    graphs: dict[str, GraphEntry]
    modalities: dict[str, ModalityEntry]
    targets: dict[str, TargetEntry] = field(default_factory=dict)
    coords: CoordsEntry | None = None

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def image_size(self) -> int:
        return int(self.model["image_size"])

    @property
    def random_weights(self) -> bool:
        return bool(self.data["weights"]["random_init"])

    @property
    def decoder_graph(self) -> str | None:
        """The decoder transformer shared by every output modality (None without outputs)."""
        decoder = self.data.get("decoder")
        return decoder["graph"] if decoder else None

    def graph(self, name: str) -> GraphEntry:
        try:
            return self.graphs[name]
        except KeyError:
            raise ManifestError(f"graph {name!r} is not in this export ({', '.join(self.graphs)})") from None

    def graph_path(self, name: str) -> Path:
        return self.directory / self.graph(name).file

    def verify(self, names: list[str] | None = None, files: list[str] | None = None) -> None:
        """Check files against the sha256 the manifest records: the graphs ``names`` (with their
        external data) and the other files ``files`` (keys of the manifest's ``files``, e.g.
        ``coords_tokenizer``); with neither given, every file of the export."""
        if names is None and files is None:
            names, files = list(self.graphs), list(self.data.get("files", {}))
        checks = []
        for name in names or []:
            entry = self.graph(name)
            checks += [(f"graph {name!r}", entry.file, entry.sha256)]
            checks += [(f"graph {name!r}", e["file"], e["sha256"]) for e in entry.external_data]
        for key in files or []:
            f = self.data.get("files", {}).get(key)
            if f is None:
                raise ManifestError(f"file {key!r} is not in this export's manifest")
            checks.append((f"file {key!r}", f["file"], f["sha256"]))
        for what, rel, expected in checks:
            path = self.directory / rel
            if not path.is_file():
                raise ManifestError(f"{what}: file {rel} is missing from {self.directory}")
            actual = sha256_file(path)
            if actual != expected:
                raise ManifestError(
                    f"{what}: {rel} has sha256 {actual[:16]}…, manifest expects {expected[:16]}… "
                    "(the file was modified or truncated; re-export)"
                )

    def verify_graph(self, name: str) -> None:
        self.verify([name])


def load_manifest(export_dir: str | Path) -> Manifest:
    directory = Path(export_dir)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory} is not a tm-deploy export: {MANIFEST_NAME} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    if data.get("format") != FORMAT_NAME:
        raise ManifestError(f"{path}: format {data.get('format')!r} is not {FORMAT_NAME!r}")
    version = data.get("format_version")
    if version == 1:
        raise ManifestError(
            f"{path}: this export has format version 1 (a whole decoder per output modality); this runtime "
            f"reads version {FORMAT_VERSION} (one shared decoder). Re-export it with this version's tm-export "
            "(same command line)"
        )
    if version != FORMAT_VERSION:
        raise ManifestError(
            f"{path}: format version {version} is not supported by this runtime (it reads {FORMAT_VERSION})"
        )
    graphs = {name: GraphEntry.from_json(name, g) for name, g in data["graphs"].items()}
    modalities = {
        name: ModalityEntry(name, m["key"], m["graph"], tuple(m["bands"]), tuple(m["mean"]), tuple(m["std"]),
                            m.get("tokenize_graph"))
        for name, m in data["modalities"].items()
    }
    targets = {name: TargetEntry.from_json(name, t) for name, t in data.get("targets", {}).items()}
    coords = CoordsEntry.from_json(data["coords"]) if data.get("coords") else None
    return Manifest(directory, data, graphs, modalities, targets, coords)
