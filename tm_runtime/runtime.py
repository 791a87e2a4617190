"""TerraMindRuntime: runs an export directory's graphs with numpy + onnxruntime only."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .backends import OrtBackend
from .backends.onnxruntime import ort_options
from .context import EncoderContext, per_group
from .coords import COORDS_TOKENIZER_FILE, CoordsTokenizer, autoregressive_decode
from .decoder import DecoderGraphs
from .inputs import check_image, check_same_batch, class_map_to_one_hot, resolve_names
from .inputs import standardize as standardize_image
from .manifest import CoordsEntry, Manifest, load_manifest
from .generation import (as_output_list, check_noise, check_timesteps, check_tokens, codes_for, destandardize,
                         diffusion_decode, diffusion_decode_device)
from .iterative import check_decoding, iterative_decode
from .embed_chain import embed_chain, run_embed_chain
from .merge import check_merge_method, merge_tokens
from .modalities import COORDS, is_coords
from .sampling import check_sampling_args, sample_tokens
from .task import TaskInfo, TaskPipeline
from .tim import TimConfig, TimOptions, generation_model, tim_parts

Layers = int | Sequence[int] | str
BACKENDS = ("ort", "ort-cuda", "tensorrt", "openvino")


def make_backend(kind, paths, manifest, export_dir, providers, threads, profile_prefix, options: dict,
                 verify: bool = True):
    """The engine behind the runtime (see ``TerraMindRuntime``); GPU backends import lazily.

    ``verify``: the ONNX Runtime backends check a graph's sha256 when its session is created, so
    graphs that are never run are never read; other backends get every file checked now."""
    if kind not in ("ort", "ort-cuda") and verify:
        manifest.verify()
    check = manifest.verify_graph if verify else None
    if not isinstance(kind, str):
        if not callable(getattr(kind, "run", None)):
            raise TypeError(f"backend must be one of {', '.join(BACKENDS)} or an object with run(), got {kind!r}")
        return kind
    if kind != "ort" and providers:
        raise ValueError(f"providers= only applies to backend='ort', not {kind!r}")
    if kind == "ort":
        return OrtBackend(paths, providers=providers, threads=threads, profile_prefix=profile_prefix,
                          before_first_use=check, **ort_options(options))
    if kind == "ort-cuda":
        from .backends.ort_cuda import OrtCudaBackend

        return OrtCudaBackend(paths, manifest, before_first_use=check, **options)
    if kind == "tensorrt":
        from .backends.tensorrt import TensorRTBackend

        return TensorRTBackend.from_export(export_dir, **options)
    if kind == "openvino":
        from .backends.openvino import OpenVinoBackend

        return OpenVinoBackend.from_manifest(paths, manifest, options, threads)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {kind!r}")


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
        verify: check every file against the manifest's sha256 before it is first used (ONNX
            Runtime backends: a graph when its session is created, so an embedding-only workload
            never reads the decoder or tokenizer files; other backends: every file at load).
        backend: "ort" (ONNX Runtime with ``providers``), "ort-cuda" (IO binding on the GPU),
            "tensorrt" (engines built/cached by tm-build-engines), "openvino" (OpenVINO, see
            ``backends.openvino.OpenVinoOptions``), or any object with ``run``.
        backend_options: for "ort", ``lean_memory`` (True: no per-session CPU arena and no
            pre-packed weight copies, ~10% less RSS with many graphs loaded, see BENCHMARKS.md
            "Memory: large") and ``spinning`` (True: intra-op threads spin-wait within a run and
            stop at its end; a few % faster on a machine the runtime has to itself, slower when
            other busy processes share the cores; off by default); keyword arguments for the
            "ort-cuda" / "tensorrt" backends; for
            "openvino" device, precision, threads, cache_dir.
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
        self._verify = verify
        paths = {name: self.manifest.graph_path(name) for name in self.manifest.graphs}
        self.backend = make_backend(backend, paths, self.manifest, export_dir, providers, threads, profile_prefix,
                                    backend_options or {}, verify)
        self._encoder = self.manifest.data["encoder"]
        self._decoder = DecoderGraphs(self.manifest)
        self._coords_tokenizer: CoordsTokenizer | None = None
        self.tim: TimConfig | None = TimConfig.from_manifest(self.manifest.data)  # a TiM backbone's step
        self._task: TaskInfo | None = None

    # -- facts about the export -------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """Input modalities: the image ones, then coords if it was exported as an input."""
        coords = self.manifest.coords
        return list(self.manifest.modalities) + ([COORDS.name] if coords and coords.input else [])

    @property
    def num_layers(self) -> int:
        return len(self._encoder["outputs"])

    @property
    def random_weights(self) -> bool:
        return self.manifest.random_weights

    # -- fine-tuned task models (tm_runtime.task) ----------------------------------------------
    @property
    def task(self) -> TaskInfo | None:
        """What a fine-tuned export (``tm-export --task-config``) predicts; None for a backbone export."""
        if self._task is None and self.manifest.data.get("task"):
            if self._verify and "task_config" in self.manifest.data.get("files", {}):
                # Nothing here reads the config (the manifest holds its facts), but it is the record of
                # what was exported: a copy edited after export would mislead whoever reads it.
                self.manifest.verify(files=["task_config"])
            self._task = TaskInfo.from_manifest(self.manifest.data["task"])
        return self._task

    def predict(self, inputs: Mapping[str, np.ndarray], standardize: bool = True, output: str = "logits",
                check_finite: bool = True, **options) -> np.ndarray:
        """A fine-tuned task model's output, as terratorch's ``task(inputs).output``: (B, K, H, W)
        float32 logits, ``output="probabilities"`` or ``"classes"`` ((B, H, W) uint8). TiM task
        models take ``embed``'s ``tim_temperature``, ``tim_top_p``, ``tim_top_k``,
        ``tim_decoding_steps`` and ``seed``. See ``tm_runtime.task.TaskPipeline.predict``."""
        if self.task is None:
            raise ValueError("this export has no task head (it is a backbone export); export a fine-tuned model "
                             "with tm-export --task-config CONFIG.yaml --ckpt CHECKPOINT")
        return TaskPipeline(self, self.task).predict(inputs, standardize=standardize, output=output,
                                                     check_finite=check_finite, **options)

    # -- coords -----------------------------------------------------------------------------
    @property
    def coords_tokenizer(self) -> CoordsTokenizer:
        if self.manifest.coords is None:
            raise ValueError("this export has no coords; re-export with coords in --modalities or --output-modalities")
        if self._coords_tokenizer is None:
            if self._verify:
                self.manifest.verify(files=["coords_tokenizer"])
            self._coords_tokenizer = CoordsTokenizer(self.manifest.directory / self.manifest.coords.tokenizer_file)
        return self._coords_tokenizer

    def _split_coords(self, inputs: Mapping[str, object]) -> tuple[dict[str, object], np.ndarray | None]:
        """(image inputs in the caller's order, coords ids (B, L) or None)."""
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a dict of modality name -> numpy array, got {type(inputs).__name__}")
        keys = [k for k in inputs if is_coords(k)]
        if not keys:
            return dict(inputs), None
        if len(keys) > 1:
            raise ValueError(f"coords given twice (as {', '.join(map(repr, keys))})")
        if not (self.manifest.coords and self.manifest.coords.input):
            raise ValueError(f"modality {keys[0]!r}: coords was not exported as an input "
                             f"(exported modalities: {', '.join(self.modalities)}); re-export with coords in --modalities")
        return {k: v for k, v in inputs.items() if k != keys[0]}, self.coords_tokenizer.encode(inputs[keys[0]])

    def _prepare_inputs(self, inputs: Mapping[str, object], standardize: bool,
                        check_finite: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None, list[str]]:
        """Checked image arrays, coords ids, and every input's name in the caller's order."""
        images, coords = self._split_coords(inputs)
        arrays = self.prepare(images, standardize, check_finite) if images or coords is None else {}
        if coords is not None and arrays:
            batch = next(iter(arrays.values())).shape[0]
            if coords.shape[0] != batch:
                raise ValueError(f"all modalities must have the same batch size, got coords={coords.shape[0]}, "
                                 + ", ".join(f"{n}={a.shape[0]}" for n, a in arrays.items()))
        order = [COORDS.name if is_coords(k) else None for k in inputs]
        image_names = iter(arrays)
        return arrays, coords, [n if n else next(image_names) for n in order]

    def embed_coords(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coords ids (B, L) -> encoder tokens (B, L, D) and their pos + modality embedding (1, L, D)."""
        graph = self.manifest.coords.embed_graph if self.manifest.coords else None
        if graph is None:
            raise ValueError("this export has no coords embedding graph")
        return tuple(self.backend.run(graph, {"ids": np.ascontiguousarray(ids, dtype=np.int64)}, ["tokens", "emb"]))

    def _input_parts(self, arrays: dict[str, np.ndarray], coords: np.ndarray | None,
                     order: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(name, tokens (B, n, D), emb (1, n, D)) of every input, in the caller's order."""
        return [(name, *(self.embed_coords(coords) if name == COORDS.name else self._embed_one(name, arrays[name])))
                for name in order]

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

    def _embed_with_context(self, arrays: dict[str, np.ndarray],
                            coords: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Concatenated tokens (B, N, D) and the inputs' pos + modality embeddings (1, N, D)."""
        order = list(arrays) + ([COORDS.name] if coords is not None else [])
        parts = self._input_parts(arrays, coords, order)
        return np.concatenate([t for _, t, _ in parts], axis=1), np.concatenate([e for _, _, e in parts], axis=1)

    def encode(self, tokens: np.ndarray, layers: list[int]) -> list[np.ndarray]:
        """The encoder graph on concatenated tokens (B, N, D); returns the requested layers."""
        outputs = self._encoder["outputs"]
        return self.backend.run(self._encoder["graph"], {"tokens": tokens}, [outputs[i] for i in layers])

    # -- decoding ---------------------------------------------------------------------------
    @property
    def output_modalities(self) -> list[str]:
        coords = self.manifest.coords
        return [t for t in self.manifest.targets if self._decodable(t)] + ([COORDS.name] if coords and coords.output
                                                                           else [])

    def _decodable(self, name: str) -> bool:
        """False for a TiM modality exported for the TiM step only (a decoder, no tokenizer decoder)."""
        return not self.manifest.data["targets"][name].get("tim_only", False)

    def _target(self, modality: str):
        from .modalities import get_target

        name = get_target(modality).name  # raises for names TerraMind cannot generate
        if name not in self.manifest.targets:
            exported = ", ".join(self.manifest.targets) or "none"
            raise ValueError(f"output modality {name} was not exported (exported targets: {exported}); "
                             f"re-export with --output-modalities {name}")
        return self.manifest.targets[name]

    def encode_context(self, arrays: dict[str, np.ndarray],
                       coords: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Run the encoder once: (normed last layer (B, N, D), context embeddings (1, N, D))."""
        last = self._encoder["outputs"][self.num_layers - 1]
        chain = embed_chain(self.manifest, list(arrays), [last]) if coords is None else None
        if chain is not None:  # images only: embed's chain (on OpenVINO the same compiled model as embed's)
            encoded, emb = run_embed_chain(self.backend, chain, arrays)
            return encoded, emb
        tokens, emb = self._embed_with_context(arrays, coords)
        return self.encode(tokens, [self.num_layers - 1])[0], emb

    def decoder_logits(self, modality: str, encoder_output: np.ndarray, context_emb: np.ndarray) -> np.ndarray:
        """One image output's logits (B, N, V) from ``encode_context``'s (encoder output, context
        embeddings): its queries through the shared decoder graph, then its head graph."""
        return self._decoder.target_logits(self.backend, self._target(modality), encoder_output, context_emb)

    def logits(self, inputs: Mapping[str, np.ndarray], modality: str, standardize: bool = False,
               check_finite: bool = True) -> np.ndarray:
        """The decoder's logits (B, N, V) for one output modality, in position order (row-major
        over the token grid), for custom sampling or uncertainty maps. (coords is decoded token by
        token: see ``coords_logits``.) A TiM modality's logits come from the TiM generation model."""
        if is_coords(modality):
            raise ValueError("coords is generated token by token; use coords_logits(inputs, ids) for the logits "
                             "of a given sequence, or generate(inputs, ['coords'])")
        target = self._target(modality)
        arrays, coords, _ = self._prepare_inputs(inputs, standardize, check_finite)
        model = generation_model(self, self.tim) if self.tim and target.name in self.tim.modalities else self
        encoded, emb = model.encode_context(arrays, coords)
        return model.decoder_logits(target.name, encoded, emb)

    def coords_logits(self, inputs: Mapping[str, np.ndarray], ids: np.ndarray, standardize: bool = False,
                      check_finite: bool = True) -> np.ndarray:
        """Causal decoder logits (B, L, V) of the coords sequence ``ids`` (B, L) ([S_1] first):
        position i scores the token after ids[:, i], seeing ids[:, :i + 1] only."""
        output = self._coords_output()
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or not 1 <= ids.shape[1] <= COORDS.max_length - 1:
            raise ValueError(f"coords: ids must be an integer array (batch, L) with 1 <= L <= {COORDS.max_length - 1}, "
                             f"got {ids.dtype} {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= COORDS.vocab_size:
            raise ValueError(f"coords: token ids must lie in [0, {COORDS.vocab_size}), got [{ids.min()}, {ids.max()}]")
        arrays, coords, _ = self._prepare_inputs(inputs, standardize, check_finite)
        encoded, emb = self.encode_context(arrays, coords)
        if ids.shape[0] != encoded.shape[0]:
            raise ValueError(f"coords: ids have batch {ids.shape[0]}, the inputs {encoded.shape[0]}")
        return self._decoder.coords_logits(self.backend, output, encoded, emb, ids)

    def _coords_output(self) -> CoordsEntry:
        """The coords entry of an export with coords as an output, or an error saying how to export it."""
        coords = self.manifest.coords
        if coords is None or not coords.output:
            exported = ", ".join(self.output_modalities) or "none"
            raise ValueError(f"output modality coords was not exported (exported targets: {exported}); "
                             "re-export with --output-modalities coords")
        return coords

    def _output_name(self, modality: str) -> str:
        if is_coords(modality):
            self._coords_output()
            return COORDS.name
        name = self._target(modality).name
        if not self._decodable(name):
            raise ValueError(f"{name} was exported for the TiM step only (its decoder, not its tokenizer): it "
                             f"cannot be generated as an image; re-export with --output-modalities {name}")
        return name

    # -- tokenizers -------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        return self.manifest.image_size // 16

    def tokenize(self, modality: str, image: np.ndarray, check_finite: bool = True) -> np.ndarray:
        """A (standardised) image (B, C, H, W) -> token ids (B, h, w) with the modality's tokenizer;
        for coords, (B, 2) [lon, lat] -> ids (B, L) with the coords tokenizer file."""
        if is_coords(modality):
            return self.coords_tokenizer.encode(image)
        target = self._target(modality)
        spec = _TokenizerInput(target)
        array = check_image(target.name, image, spec, self.manifest.image_size, check_finite)
        return self.backend.run(f"tokenize_{target.name}", {"image": array}, ["ids"])[0]

    def decode_tokens(self, modality: str, tokens: np.ndarray, timesteps: int = 10,
                      noise: np.ndarray | None = None, standardize: bool = False, seed: int | None = None,
                      rng: np.random.Generator | None = None, progress=None) -> np.ndarray:
        """Token ids (B, h, w) -> image (B, C, H, W), in standardised units unless ``standardize``.

        Diffusion targets run ``timesteps`` DDIM steps from ``noise`` (B, C, H, W) (drawn from the
        seeded Generator when None); LULC returns its (B, 10, H, W) class logits in one pass;
        coords ids (B, L) give (B, 2) [lon, lat] (NaN for a row that does not spell coordinates).
        """
        if is_coords(modality):
            return self.coords_tokenizer.decode(tokens)
        target = self._target(self._output_name(modality))
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
        Coords (when exported): as an input, a (B, 2) array of [lon, lat] degrees; as an output,
        generated token by token over the causal decoder graph (at most three steps) and returned
        as (B, 2) float64 [lon, lat], NaN for a row that did not spell coordinates.
        Returns {name: array}, and with ``return_tokens`` also {name: ids (B, h, w)} (coords:
        the generated ids (B, L), right-padded with [PAD]).
        """
        names = [self._output_name(m) for m in as_output_list(output_modalities)]
        if len(set(names)) != len(names):
            raise ValueError(f"an output modality is listed twice: {list(output_modalities)}")
        timesteps = check_timesteps(timesteps)
        check_sampling_args(temperature, top_k, top_p)
        noise = dict(noise or {})
        unknown_noise = sorted(set(noise) - set(names) | ({COORDS.name} & set(noise)))
        if unknown_noise:
            raise ValueError(f"noise given for {', '.join(unknown_noise)}, which is not among the diffusion outputs "
                             f"{[n for n in names if n != COORDS.name]}")
        arrays, coords_in, order = self._prepare_inputs(inputs, standardize, check_finite)
        clash = [n for n in names if n in order]
        if clash:
            raise ValueError(f"{', '.join(clash)} is both an input and an output; TerraMind generates "
                             "outputs from the other inputs (drop it from one of them)")
        if chained:
            missing = [n for n in names[:-1] if not self._condition_graph(n)]
            if missing:
                raise ValueError(f"chained generation feeds {', '.join(missing)} back to the encoder, but this "
                                 "export has no token-embedding graph for it; put it last or pass chained=False")
        check_decoding(decoding_steps, scheme, self.grid * self.grid)
        image_names = [n for n in names if n != COORDS.name]
        if decoding_steps > 1:
            missing = [n for n in image_names if not self._condition_graph(n)]
            if missing:
                raise ValueError(f"decoding_steps > 1 feeds decoded tokens of {', '.join(missing)} back to the "
                                 "encoder, but this export has no token-embedding graph for it")
        rng = np.random.default_rng(seed)
        parts = self._input_parts(arrays, coords_in, order)
        batch = parts[0][1].shape[0]
        context = EncoderContext(batch)
        for _, t, e in parts:
            context.append(t, e)
        pending_coords = None
        if chained and COORDS.name in names[:-1]:
            # As upstream: a coords output that conditions later ones already sits in the encoder
            # input, as its start token [S_1], until it is generated.
            pending_coords = context.num_parts
            context.append(*self.embed_coords(np.full((batch, 1), COORDS.start_id, dtype=np.int64)))
        groups = None
        images, tokens = {}, {}
        for i, name in enumerate(names):
            if groups is None or chained:
                groups = [(rows, self.encode(t, [self.num_layers - 1])[0], e) for rows, t, e in context.groups()]
            feed_back = chained and i < len(names) - 1
            if name == COORDS.name:
                ids, lengths = self._generate_coords(groups, batch, rng, temperature, top_k, top_p, progress)
                tokens[name], images[name] = ids, self.coords_tokenizer.decode(ids)
                if feed_back:
                    # One graph call for the padded batch: token i's embedding depends on its id and
                    # position only, so each row keeps its first n tokens (none for an empty span).
                    t, e = self.embed_coords(ids) if ids.shape[1] else (None, None)
                    context.replace_part(pending_coords, t, e, lengths)
                continue
            if decoding_steps == 1:
                logits = per_group(groups, batch, lambda rows, enc, emb: self.decoder_logits(name, enc, emb))
                ids = sample_tokens(logits, rng, temperature=temperature, top_k=top_k, top_p=top_p)
            else:
                ids = np.stack([
                    iterative_decode(self._partial_logits_fn(name, *context.row(b)),
                                     self.grid * self.grid, decoding_steps, scheme, rng, temperature, top_k, top_p)
                    for b in range(batch)])
            tokens[name] = ids.reshape(ids.shape[0], self.grid, self.grid)
            if feed_back:
                # As upstream: a generated output conditions the ones after it, as an encoder input.
                context.append(*self.backend.run(self.manifest.targets[name].condition_graph,
                                                 {"ids": tokens[name].astype(np.int64)}, ["tokens", "emb"]))
            if progress:
                progress(f"{name} tokens", 1, 1)
            images[name] = self.decode_tokens(name, tokens[name], timesteps, noise=noise.get(name),
                                              standardize=standardize, rng=rng, progress=progress)
        return (images, tokens) if return_tokens else images

    def _condition_graph(self, name: str) -> str | None:
        if name == COORDS.name:
            return self.manifest.coords.embed_graph
        return self.manifest.targets[name].condition_graph

    def _generate_coords(self, groups: list, batch: int, rng: np.random.Generator, temperature: float, top_k: int,
                         top_p: float, progress) -> tuple[np.ndarray, list[int]]:
        """The autoregressive coords loop over the causal decoder graph; returns the merged ids
        (B, L) padded with [PAD] and each row's length."""
        coords = self._coords_output()

        def logits_fn(ids: np.ndarray) -> np.ndarray:
            return per_group(groups, batch, lambda rows, enc, emb: self._decoder.coords_logits(
                self.backend, coords, enc, emb, ids[rows]))

        generated = autoregressive_decode(logits_fn, batch, rng, temperature, top_k, top_p, progress=progress)
        return self.coords_tokenizer.merge(generated)

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
        tim_temperature: float | None = None,
        tim_top_p: float | None = None,
        tim_top_k: int | None = None,
        tim_decoding_steps: int | None = None,
        seed: int | None = None,
    ):
        """Embeddings of the given modalities, as terratorch's TerraMind backbone returns them.

        ``inputs``: {modality: (B, C, H, W) array}, any non-empty subset of the exported
        modalities (coords: a (B, 2) [lon, lat] array); tokens are concatenated in the order given
        (as upstream). Coords tokens take part in attention but, as upstream, only 'dict' and None
        return them.
        ``layers``: -1 (the normed last layer, returned alone), any int, a list of ints, or
        'all' (a list of every layer; only the last one is normed, as upstream).
        ``merge_method``: 'mean' | 'max' | 'concat' | 'dict' | None (see ``merge.merge_tokens``).
        ``standardize``: apply TerraMind's pretraining mean/std per channel first.
        TiM backbones (``rt.tim``; see ``tim``) first generate the tokens of their TiM modalities
        that are not among the inputs and encode them after the inputs; 'mean'/'max'/'concat'
        merge them in and, as upstream, 'dict' returns the inputs only. ``tim_temperature``,
        ``tim_top_p``, ``tim_top_k``, ``tim_decoding_steps`` (None: the export's defaults,
        upstream's 1.0, 0.8, 0, 1) and ``seed`` steer its sampling; temperature 0 is argmax.
        """
        check_merge_method(merge_method)
        options = TimOptions.resolve(self.tim, tim_temperature, tim_top_p, tim_top_k, tim_decoding_steps, seed)
        indices, single = self._layer_indices(layers)
        arrays, coords, order = self._prepare_inputs(inputs, standardize, check_finite)
        outputs = [self._encoder["outputs"][i] for i in indices]
        chain = embed_chain(self.manifest, order, outputs) if not self.tim and coords is None else None
        thought = []
        if chain is not None:  # images only: the graphs as one chain (one model on OpenVINO)
            encoded = run_embed_chain(self.backend, chain, arrays, outputs)[:-1]  # (not the context embeddings)
            layout = chain.layout
        else:
            parts = self._input_parts(arrays, coords, order)
            thought = tim_parts(self, self.tim, arrays, coords, order, parts, options) if self.tim else []
            encoded = self.encode(np.concatenate([t for _, t, _ in parts + thought], axis=1), indices)
            layout = [(name, t.shape[1], name != COORDS.name) for name, t, _ in parts + thought]
        images = set(self.manifest.modalities) | set(self.tim.modalities if self.tim else ())
        missing = len(images) - len(arrays) - len(thought)
        merged = [merge_tokens(out, layout, merge_method, missing) for out in encoded]
        if merge_method == "dict" and thought:
            merged = [{k: v for k, v in m.items() if k in order} for m in merged]
        return merged[0] if single else merged
