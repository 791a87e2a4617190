"""TerraMindRuntime: runs an export directory's graphs with numpy + onnxruntime only."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .backends import OrtBackend
from .inputs import check_image, check_same_batch, resolve_names, standardize as standardize_image
from .manifest import Manifest, load_manifest
from .merge import check_merge_method, merge_tokens

Layers = int | Sequence[int] | str


class TerraMindRuntime:
    """Load an export made by ``tm-export`` and run it.

    Args:
        export_dir: the directory holding ``manifest.json`` and the ONNX graphs.
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads per session (default: ONNX Runtime's choice).
        verify: check every graph file against the manifest's sha256 before use.
    """

    def __init__(
        self,
        export_dir: str | Path,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        threads: int | None = None,
        verify: bool = True,
        profile_prefix: str | None = None,
    ) -> None:
        self.manifest: Manifest = load_manifest(export_dir)
        if verify:
            self.manifest.verify()
        paths = {name: self.manifest.graph_path(name) for name in self.manifest.graphs}
        self.backend = OrtBackend(paths, providers=providers, threads=threads, profile_prefix=profile_prefix)
        self._encoder = self.manifest.data["encoder"]

    # -- facts about the export -------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.modalities)

    @property
    def num_layers(self) -> int:
        return len(self._encoder["outputs"])

    @property
    def random_weights(self) -> bool:
        return self.manifest.random_weights

    # -- embedding --------------------------------------------------------------------------
    def prepare(self, inputs: Mapping[str, np.ndarray], standardize: bool = False,
                check_finite: bool = True) -> dict[str, np.ndarray]:
        """Validate (and optionally standardise) the inputs; returns float32 arrays by modality."""
        resolved = resolve_names(inputs, self.manifest.modalities)
        size = self.manifest.image_size
        arrays = {
            name: check_image(name, value, self.manifest.modalities[name], size, check_finite)
            for name, value in resolved.items()
        }
        check_same_batch(arrays)
        if standardize:
            arrays = {name: standardize_image(a, self.manifest.modalities[name]) for name, a in arrays.items()}
        return arrays

    def patch_embed(self, name: str, image: np.ndarray) -> np.ndarray:
        """One modality's patch-embedding graph: (B, C, H, W) -> (B, N, D) with positions added."""
        graph = self.manifest.modalities[name].graph
        return self.backend.run(graph, {"image": image}, ["tokens"])[0]

    def _embed_with_context(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated tokens (B, N, D) and the inputs' pos + modality embeddings (1, N, D)."""
        tokens, embs = [], []
        for name, image in arrays.items():
            t, e = self.backend.run(self.manifest.modalities[name].graph, {"image": image}, ["tokens", "emb"])
            tokens.append(t)
            embs.append(e)
        return np.concatenate(tokens, axis=1), np.concatenate(embs, axis=1)

    def encode(self, tokens: np.ndarray, layers: list[int]) -> list[np.ndarray]:
        """The encoder graph on concatenated tokens (B, N, D); returns the requested layers."""
        outputs = self._encoder["outputs"]
        return self.backend.run(self._encoder["graph"], {"tokens": tokens}, [outputs[i] for i in layers])

    # -- decoding ---------------------------------------------------------------------------
    @property
    def output_modalities(self) -> list[str]:
        return list(self.manifest.targets)

    def _target(self, modality: str):
        from .modalities import get_target

        name = get_target(modality).name  # raises for names TerraMind cannot generate
        if name not in self.manifest.targets:
            exported = ", ".join(self.manifest.targets) or "none"
            raise ValueError(f"output modality {name} was not exported (exported targets: {exported}); "
                             f"re-export with --output-modalities {name}")
        return self.manifest.targets[name]

    def encode_context(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run the encoder once: (normed last layer (B, N, D), context embeddings (1, N, D))."""
        tokens, emb = self._embed_with_context(arrays)
        return self.encode(tokens, [self.num_layers - 1])[0], emb

    def decoder_logits(self, modality: str, encoder_output: np.ndarray, context_emb: np.ndarray) -> np.ndarray:
        target = self._target(modality)
        feeds = {"encoder_output": encoder_output, "context_emb": context_emb}
        return self.backend.run(target.graph, feeds, ["logits"])[0]

    def logits(self, inputs: Mapping[str, np.ndarray], modality: str, standardize: bool = False,
               check_finite: bool = True) -> np.ndarray:
        """The decoder's logits (B, N, V) for one output modality, in position order (row-major
        over the token grid), for custom sampling or uncertainty maps."""
        target = self._target(modality)
        arrays = self.prepare(inputs, standardize=standardize, check_finite=check_finite)
        encoded, emb = self.encode_context(arrays)
        return self.decoder_logits(target.name, encoded, emb)

    def _layer_indices(self, layers: Layers) -> tuple[list[int], bool]:
        """Normalise ``layers`` to indices; the flag says whether to return a single item."""
        n = self.num_layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"layers must be an int, a list of ints or 'all', got {layers!r}")
            return list(range(n)), False
        single = isinstance(layers, (int, np.integer))
        picked = [int(layers)] if single else list(layers)
        if not picked:
            raise ValueError("layers is empty")
        out = []
        for i in picked:
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool):
                raise TypeError(f"layer indices must be ints, got {i!r}")
            if not -n <= i < n:
                raise ValueError(f"layer index {i} is out of range for an encoder with {n} layers")
            out.append(int(i) % n)
        return out, single

    def embed(
        self,
        inputs: Mapping[str, np.ndarray],
        merge_method: str | None = "mean",
        layers: Layers = -1,
        standardize: bool = False,
        check_finite: bool = True,
    ):
        """Embeddings of the given modalities, as terratorch's TerraMind backbone returns them.

        ``inputs``: {modality: (B, C, H, W) array}, any non-empty subset of the exported
        modalities; tokens are concatenated in the order given (as upstream).
        ``layers``: -1 (the normed last layer, returned alone), any int, a list of ints, or
        'all' (a list of every layer; only the last one is normed, as upstream).
        ``merge_method``: 'mean' | 'max' | 'concat' | 'dict' | None (see ``merge.merge_tokens``).
        ``standardize``: apply TerraMind's pretraining mean/std per channel first.
        """
        check_merge_method(merge_method)
        indices, single = self._layer_indices(layers)
        arrays = self.prepare(inputs, standardize=standardize, check_finite=check_finite)
        names = list(arrays)
        tokens = np.concatenate([self.patch_embed(name, a) for name, a in arrays.items()], axis=1)
        per_modality = tokens.shape[1] // len(names)
        missing = len(self.manifest.modalities) - len(names)
        merged = [merge_tokens(out, names, per_modality, merge_method, missing)
                  for out in self.encode(tokens, indices)]
        return merged[0] if single else merged
