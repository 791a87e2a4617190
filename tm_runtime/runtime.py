"""TerraMindRuntime: runs an export directory's graphs with numpy + onnxruntime only."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .backends import OrtBackend
from .inputs import check_image, check_same_batch, class_map_to_one_hot, resolve_names
from .inputs import standardize as standardize_image
from .manifest import Manifest, load_manifest
from .generation import (as_output_list, check_noise, check_timesteps, check_tokens, codes_for, destandardize,
                         diffusion_decode, diffusion_decode_device)
from .iterative import check_decoding, iterative_decode
from .merge import check_merge_method, merge_tokens
from .sampling import check_sampling_args, sample_tokens

Layers = int | Sequence[int] | str


def make_backend(kind, paths, manifest, export_dir, providers, threads, profile_prefix, options: dict):
    """The engine behind the runtime (see ``TerraMindRuntime``); GPU backends import lazily."""
    if not isinstance(kind, str):
        if not callable(getattr(kind, "run", None)):
            raise TypeError(f"backend must be 'ort', 'ort-cuda', 'tensorrt' or an object with run(), got {kind!r}")
        return kind
    if kind != "ort" and providers:
        raise ValueError(f"providers= only applies to backend='ort', not {kind!r}")
    if kind == "ort":
        return OrtBackend(paths, providers=providers, threads=threads, profile_prefix=profile_prefix)
    if kind == "ort-cuda":
        from .backends.ort_cuda import OrtCudaBackend

        return OrtCudaBackend(paths, manifest, **options)
    if kind == "tensorrt":
        from .backends.tensorrt import TensorRTBackend

        return TensorRTBackend.from_export(export_dir, **options)
    raise ValueError(f"backend must be 'ort', 'ort-cuda' or 'tensorrt', got {kind!r}")


class _TokenizerInput:
    """Adapts a generation target to the input checks (channels and band names)."""

    def __init__(self, target) -> None:
        self.num_channels = target.channels
        self.bands = tuple(f"channel {i}" for i in range(target.channels))


class TerraMindRuntime:
    """Load an export made by ``tm-export`` and run it.

    Args:
        export_dir: the directory holding ``manifest.json`` and the ONNX graphs.
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads per session (default: ONNX Runtime's choice).
        verify: check every graph file against the manifest's sha256 before use.
        backend: "ort" (ONNX Runtime with ``providers``), "ort-cuda" (IO binding on the GPU),
            "tensorrt" (engines built/cached by tm-build-engines), or any object with ``run``.
        backend_options: keyword arguments for the "ort-cuda" / "tensorrt" backends.
    """

    def __init__(
        self,
        export_dir: str | Path,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        threads: int | None = None,
        verify: bool = True,
        profile_prefix: str | None = None,
        backend: str | object = "ort",
        backend_options: dict | None = None,
    ) -> None:
        self.manifest: Manifest = load_manifest(export_dir)
        if verify:
            self.manifest.verify()
        paths = {name: self.manifest.graph_path(name) for name in self.manifest.graphs}
        self.backend = make_backend(backend, paths, self.manifest, export_dir, providers, threads, profile_prefix,
                                    backend_options or {})
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
        specs = self.manifest.modalities
        arrays = {
            name: check_image(name, class_map_to_one_hot(name, value, specs[name]) if specs[name].tokenized
                              else value, specs[name], size, check_finite)
            for name, value in resolved.items()
        }
        check_same_batch(arrays)
        if standardize:
            arrays = {name: standardize_image(a, self.manifest.modalities[name]) for name, a in arrays.items()}
        return arrays

    def _embed_one(self, name: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens (B, N, D), emb (1, N, D)) of one prepared input; tokenised inputs (LULC, NDVI)
        go through their tokenizer's encoder graph first."""
        spec = self.manifest.modalities[name]
        if spec.tokenized:
            ids = self.backend.run(spec.tokenize_graph, {"image": image}, ["ids"])[0]
            t, e = self.backend.run(spec.graph, {"ids": ids.astype(np.int64)}, ["tokens", "emb"])
        else:
            t, e = self.backend.run(spec.graph, {"image": image}, ["tokens", "emb"])
        return t, e

    def patch_embed(self, name: str, image: np.ndarray) -> np.ndarray:
        """One modality's embedding graph(s): (B, C, H, W) -> (B, N, D) with positions added."""
        return self._embed_one(name, image)[0]

    def _embed_with_context(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated tokens (B, N, D) and the inputs' pos + modality embeddings (1, N, D)."""
        pairs = [self._embed_one(name, image) for name, image in arrays.items()]
        return np.concatenate([t for t, _ in pairs], axis=1), np.concatenate([e for _, e in pairs], axis=1)

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

    # -- tokenizers -------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        return self.manifest.image_size // 16

    def tokenize(self, modality: str, image: np.ndarray, check_finite: bool = True) -> np.ndarray:
        """A (standardised) image (B, C, H, W) -> token ids (B, h, w) with the modality's tokenizer."""
        target = self._target(modality)
        spec = _TokenizerInput(target)
        array = check_image(target.name, image, spec, self.manifest.image_size, check_finite)
        return self.backend.run(f"tokenize_{target.name}", {"image": array}, ["ids"])[0]

    def decode_tokens(self, modality: str, tokens: np.ndarray, timesteps: int = 10,
                      noise: np.ndarray | None = None, standardize: bool = False, seed: int | None = None,
                      rng: np.random.Generator | None = None, progress=None) -> np.ndarray:
        """Token ids (B, h, w) -> image (B, C, H, W), in standardised units unless ``standardize``.

        Diffusion targets run ``timesteps`` DDIM steps from ``noise`` (B, C, H, W) (drawn from the
        seeded Generator when None); LULC returns its (B, 10, H, W) class logits in one pass.
        """
        target = self._target(modality)
        timesteps = check_timesteps(timesteps)
        ids = check_tokens(target.name, tokens, target.vocab_size, self.grid)
        codes = codes_for(target.fsq_levels, ids)
        if target.tokenizer_decoder == "vit":
            out = self.backend.run(f"detokenize_{target.name}", {"quant": codes}, ["logits"])[0]
        else:
            size = self.manifest.image_size
            shape = (ids.shape[0], target.channels, size, size)
            if noise is None:
                rng = rng if rng is not None else np.random.default_rng(seed)
                noise = rng.standard_normal(shape, dtype=np.float32)
            noise = check_noise(target.name, noise, shape)

            graph = f"unet_{target.name}"
            if hasattr(self.backend, "run_device"):  # GPU backends: x stays on the device

                def step_on_device(feeds: dict) -> object:
                    return self.backend.run_device(graph, feeds, ["x_prev"])["x_prev"]

                out = diffusion_decode_device(step_on_device, self._to_host, codes, noise, timesteps, progress,
                                              target.name)
            else:

                def unet(x: np.ndarray, t: np.ndarray, quant: np.ndarray, ddim: np.ndarray) -> np.ndarray:
                    return self.backend.run(graph, {"x_t": x, "t": t, "quant": quant, "ddim": ddim}, ["x0"])[0]

                out = diffusion_decode(unet, codes, noise, timesteps, progress, target.name)
        return destandardize(out, target.mean, target.std) if standardize else out

    def _to_host(self, value: object) -> np.ndarray:
        """A backend's device array (ORT OrtValue or our DeviceArray) as a numpy array."""
        if isinstance(value, np.ndarray):
            return value
        if hasattr(value, "numpy"):
            return np.asarray(value.numpy())
        return value.to_host(self.backend.stream)

    # -- generation -------------------------------------------------------------------------
    def generate(
        self,
        inputs: Mapping[str, np.ndarray],
        output_modalities: str | Sequence[str],
        timesteps: int = 10,
        seed: int | None = None,
        temperature: float = 1.0,
        top_p: float = 0.8,
        top_k: int = 0,
        standardize: bool = True,
        return_tokens: bool = False,
        noise: Mapping[str, np.ndarray] | None = None,
        chained: bool = True,
        decoding_steps: int = 1,
        scheme: str = "roar",
        check_finite: bool = True,
        progress=None,
    ):
        """Generate ``output_modalities`` from ``inputs``, as terratorch's ``*_generate`` models do.

        Outputs are generated in the order given and, as in terratorch, each generated output is fed
        back to the encoder as a token input and conditions the outputs after it (``chained``); the
        encoder therefore runs once per output. ``chained=False`` makes the outputs independent
        given the inputs and runs the encoder once for all of them. Per output: the
        decoder graph -> sampling (top-p on the raw logits, then temperature, then a categorical
        draw; temperature 0 = argmax) -> FSQ codes -> ``timesteps`` DDIM steps over the UNet graph
        (or, for LULC, the ViT decoder: 10-class logits) -> de-standardised if ``standardize``.
        ``standardize`` also standardises the inputs with the pretraining statistics, as upstream.
        ``noise`` optionally gives the initial diffusion noise per output (B, C, H, W).
        ``decoding_steps > 1`` decodes the tokens in several passes with the ``scheme`` 'roar' or
        'maskgit', feeding decoded tokens back to the encoder (an extension: see ``iterative``).
        ``progress(label, step, total)`` is called after every decoder pass and denoising step.
        Returns {name: array}, and with ``return_tokens`` also {name: ids (B, h, w)}.
        """
        names = [self._target(m).name for m in as_output_list(output_modalities)]
        if len(set(names)) != len(names):
            raise ValueError(f"an output modality is listed twice: {list(output_modalities)}")
        timesteps = check_timesteps(timesteps)
        check_sampling_args(temperature, top_k, top_p)
        noise = dict(noise or {})
        unknown_noise = sorted(set(noise) - set(names))
        if unknown_noise:
            raise ValueError(f"noise given for {', '.join(unknown_noise)}, which is not among the outputs {names}")
        arrays = self.prepare(inputs, standardize=standardize, check_finite=check_finite)
        clash = [n for n in names if n in arrays]
        if clash:
            raise ValueError(f"{', '.join(clash)} is both an image input and an output; TerraMind generates "
                             "outputs from the other inputs (drop it from one of them)")
        if chained:
            missing = [n for n in names[:-1] if not self.manifest.targets[n].condition_graph]
            if missing:
                raise ValueError(f"chained generation feeds {', '.join(missing)} back to the encoder, but this "
                                 "export has no token-embedding graph for it; put it last or pass chained=False")
        check_decoding(decoding_steps, scheme, self.grid * self.grid)
        if decoding_steps > 1:
            missing = [n for n in names if not self.manifest.targets[n].condition_graph]
            if missing:
                raise ValueError(f"decoding_steps > 1 feeds decoded tokens of {', '.join(missing)} back to the "
                                 "encoder, but this export has no token-embedding graph for it")
        rng = np.random.default_rng(seed)
        context_tokens, context_emb = self._embed_with_context(arrays)
        encoded = None
        images, tokens = {}, {}
        for i, name in enumerate(names):
            if encoded is None or chained:
                encoded = self.encode(context_tokens, [self.num_layers - 1])[0]
            if decoding_steps == 1:
                logits = self.decoder_logits(name, encoded, context_emb)
                ids = sample_tokens(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
            else:
                ids = np.stack([
                    iterative_decode(self._partial_logits_fn(name, context_tokens[b:b + 1], context_emb),
                                     self.grid * self.grid, decoding_steps, scheme, rng, temperature, top_k, top_p)
                    for b in range(context_tokens.shape[0])])
            tokens[name] = ids.reshape(ids.shape[0], self.grid, self.grid)
            if chained and i < len(names) - 1:
                # As upstream: a generated output conditions the ones after it, as an encoder input.
                t, e = self.backend.run(self.manifest.targets[name].condition_graph,
                                        {"ids": tokens[name].astype(np.int64)}, ["tokens", "emb"])
                context_tokens = np.concatenate([context_tokens, t], axis=1)
                context_emb = np.concatenate([context_emb, e], axis=1)
            if progress:
                progress(f"{name} tokens", 1, 1)
            images[name] = self.decode_tokens(name, tokens[name], timesteps, noise=noise.get(name),
                                              standardize=standardize, rng=rng, progress=progress)
        return (images, tokens) if return_tokens else images

    def _partial_logits_fn(self, name: str, tokens: np.ndarray, emb: np.ndarray):
        """For one batch row: logits of every position of ``name`` given the tokens decoded so far,
        which join the encoder input through the output's token embedding."""
        graph = self.manifest.targets[name].condition_graph

        def logits_fn(ids: np.ndarray, known: np.ndarray) -> np.ndarray:
            t, e = tokens, emb
            if known.any():
                tok, tok_emb = self.backend.run(graph, {"ids": ids.reshape(1, self.grid, self.grid)}, ["tokens", "emb"])
                t = np.concatenate([tokens, tok[:, known]], axis=1)
                e = np.concatenate([emb, tok_emb[:, known]], axis=1)
            encoded = self.encode(t, [self.num_layers - 1])[0]
            return self.decoder_logits(name, encoded, e)[0]

        return logits_fn

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
