"""The fine-tuned task model as the export traces it: TerraMind's patch embeddings and encoder (the
existing reference, fed the fine-tuned weights) and a ``TaskHead`` (necks after the hoisted layer
selection, decoder, head, rescale) whose module names are terratorch's.

Between the two, on the host: merging the modalities' tokens (``merge_method``) and pooling the
dates of a temporal model. They are cheap reshapes and reductions that depend on which
modalities and how many dates a call brings, so they stay out of the graphs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..reference.terramind import TerraMindModel, get_variant
from ..tim import GENERATION_KEY
from .config import TaskConfigError, TaskSpec
from .decoders import build_decoder
from .heads import RegressionHead, SegmentationHead
from .necks import SelectIndices, build_neck
from .tim import build_tim_backbone, tim_backbone_keys

PATCH = 16


class TaskHead(nn.Module):
    """Selected encoder layers, merged and pooled, (B, h*w, C_i) each -> outputs (B, K, H, W).

    ``neck`` keeps every configured neck at its config index (so checkpoint keys match); a leading
    SelectIndices is applied by choosing which encoder layers feed this module, and skipped here.
    """

    def __init__(self, spec: TaskSpec, backbone_channels: list[int], image_size: int) -> None:
        super().__init__()
        self.grid = (image_size // PATCH, image_size // PATCH)
        self.image_size = (image_size, image_size)
        channels = list(backbone_channels)
        necks = []
        for i, neck_spec in enumerate(spec.necks):
            neck = build_neck(neck_spec, channels, self.grid, i)
            channels = neck.channels
            necks.append(neck)
        self.neck = nn.ModuleList(necks)
        self.first_neck = 1 if necks and isinstance(necks[0], SelectIndices) else 0
        selected = necks[0].indices if self.first_neck else list(range(len(backbone_channels)))
        self.selected_channels = [backbone_channels[i] for i in selected]
        # Which selected features the output depends on (FCN and Identity decoders read one):
        # only those become graph inputs; the others are zero placeholders the exporter prunes.
        self.used = list(range(len(selected)))
        self.decoder = build_decoder(spec.decoder, channels, dict(spec.decoder_args))
        try:
            if spec.task_type == "segmentation":
                self.head = SegmentationHead(self.decoder.out_channels, spec.num_classes, **spec.head_args)
            else:
                self.head = RegressionHead(self.decoder.out_channels, spec.num_outputs, **spec.head_args)
        except TaskConfigError:
            raise
        except (TypeError, ValueError, RuntimeError) as exc:
            keys = ", ".join(f"head_{k}" for k in spec.head_args) or "head"
            raise TaskConfigError(f"model.init_args.model_args.{keys}: the {spec.task_type} head with "
                                  f"{spec.head_args} failed ({type(exc).__name__}: {exc})") from exc
        self.rescale = spec.rescale
        self.size_out = spec.image_size_out
        self.output_shape = self._probe()
        self.layers = [selected[i] for i in self.used]
        self.input_channels = [self.selected_channels[i] for i in self.used]

    def _probe(self) -> tuple[int, ...]:
        """Run once: checks that the chain fits together, finds the features the output depends
        on, and gives the output's shape."""
        tokens = self.grid[0] * self.grid[1]
        inputs = [torch.randn(1, tokens, c, requires_grad=True) for c in self.selected_channels]
        try:
            out = self.eval()(*inputs)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise TaskConfigError(
                "model.init_args.model_args: the necks, decoder and head do not fit together on TerraMind's "
                f"{self.grid[0]}x{self.grid[1]} tokens ({str(exc).splitlines()[0]}); a decoder needs image "
                "features (ReshapeTokensToImage) in the number it expects") from exc
        grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
        self.used = [i for i, g in enumerate(grads) if g is not None]
        return tuple(out.shape[1:])

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        if len(features) == len(self.used) < len(self.selected_channels):
            given = dict(zip(self.used, features))
            batch, tokens = features[0].shape[0], features[0].shape[1]
            features = tuple(given[i] if i in given else features[0].new_zeros(batch, tokens, c)
                             for i, c in enumerate(self.selected_channels))
        x = list(features)
        for neck in list(self.neck)[self.first_neck:]:
            x = neck(x)
        out = self.head(self.decoder([f for f in x]))
        if self.rescale and tuple(out.shape[-2:]) != self.image_size:
            out = F.interpolate(out, size=self.image_size, mode="bilinear")
        if self.size_out is not None:
            h, w = int(out.shape[-2]), int(out.shape[-1])
            top, left = max((h - self.size_out[0]) // 2, 0), max((w - self.size_out[1]) // 2, 0)
            out = out[..., top:top + self.size_out[0], left:left + self.size_out[1]]
        return out


@dataclass
class TaskModel:
    spec: TaskSpec
    encoder: TerraMindModel
    head: TaskHead
    # Where the backbone's keys sit in the task state_dict: terratorch's TemporalWrapper nests it.
    encoder_prefix: str
    # A TiM backbone's frozen generation model (its encoder side; ``encoder`` holds its decoder),
    # when its weights were read apart from the fine-tuned encoder's (see task/tim.py).
    generation: TerraMindModel | None = None

    @property
    def layers(self) -> list[int]:
        return self.head.layers


def backbone_channels(spec: TaskSpec) -> list[int]:
    """Channels of every encoder layer after merging and temporal pooling (terratorch's
    ``out_channels`` of the backbone, or of the TemporalWrapper around it)."""
    variant = get_variant(spec.size)
    # A TiM backbone's generated modalities are image tokens too: concat lays them out after the inputs.
    images = len(spec.modalities) + (len(spec.tim.modalities) if spec.tim else 0)
    dim = variant.dim * (images if spec.merge_method == "concat" else 1)
    if spec.temporal is not None and spec.temporal.pooling == "concat":
        dim *= spec.temporal.n_timestamps
    return [dim] * variant.encoder_depth


def build_task_model(spec: TaskSpec, image_size: int = 224, tim_state: dict[str, torch.Tensor] | None = None,
                     seed: int = 0, source: str = "") -> TaskModel:
    """The task model's reference: backbone and ``TaskHead``, weights still to load
    (``load_task_state``) or randomise (``randomize_task_model``).

    A TiM backbone (``spec.tim``) is built with its weights in one go (see task/tim.py): from
    ``tim_state``, the task state_dict ``source`` holds, or seeded random weights when None.
    """
    if image_size % (2 * PATCH):
        # terratorch pads inputs to a multiple of twice the patch size (reflect) and crops the output
        # back; exports take sizes where that is the identity.
        raise TaskConfigError(f"image size {image_size}: task exports need a multiple of {2 * PATCH} "
                              "(terratorch would pad other sizes)")
    head = TaskHead(spec, backbone_channels(spec), image_size)
    prefix = "encoder.encoder." if spec.temporal is not None else "encoder."
    if spec.tim is not None:
        encoder, generation = build_tim_backbone(spec, image_size, prefix, tim_state, seed, source)
        return TaskModel(spec, encoder, head.eval(), prefix, generation)
    variant = get_variant(spec.size)
    channels = {m: len(b) for m, b in spec.bands.items()}
    encoder = TerraMindModel(variant, list(spec.modalities), channels=channels, image_size=image_size)
    return TaskModel(spec, encoder.eval(), head.eval(), prefix)


def expected_keys(model: TaskModel) -> dict[str, tuple[nn.Module, str]]:
    """Every key the task checkpoint must hold -> (module to load it into, key inside it). A TiM
    backbone's weights are already in place (``build_task_model``): only the head's are listed."""
    out = {} if model.spec.tim else {model.encoder_prefix + k: (model.encoder, k) for k in model.encoder.state_dict()}
    out.update({k: (model.head, k) for k in model.head.state_dict()})
    return out


def load_task_state(model: TaskModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Load the fine-tuned weights; any missing, unexpected or mis-shaped key is an error naming it."""
    expected = expected_keys(model)
    # Parameters the export does not use: concat's filler for absent modalities (predict requires
    # every modality with concat).
    unused = {model.encoder_prefix + "missing_mod_token"} if model.spec.merge_method == "concat" else set()
    aux = [k for k in state if k.startswith("aux_heads.")]
    if aux:
        raise TaskConfigError(f"{source}: holds auxiliary heads (model.{aux[0]}), which tm-export does not export")
    if model.spec.tim:
        unused |= tim_backbone_keys(model, state)
    else:
        tim = next((k for k in state if k.startswith(model.encoder_prefix + GENERATION_KEY)), None)
        if tim is not None:
            raise TaskConfigError(
                f"{source}: holds a TiM backbone (model.{model.encoder_prefix}{GENERATION_KEY}*), but the config's "
                f"backbone {model.spec.backbone} is not one: set model.init_args.model_args.backbone to "
                f"terramind_v1_{model.spec.size}_tim (and backbone_tim_modalities as in training)")
    unexpected = [k for k in state if k not in expected and k not in unused]
    missing = [k for k in expected if k not in state]
    hint = ("(does the config's backbone, backbone_modalities, backbone_bands, merge method, necks, decoder and "
            "num_classes match the checkpoint?)")
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise TaskConfigError(f"{source}: unexpected key model.{unexpected[0]}{more}: the config builds no such "
                              f"parameter {hint}")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise TaskConfigError(f"{source}: missing key model.{missing[0]}{more} {hint}")
    per_module: dict[int, dict[str, torch.Tensor]] = {}
    for key, (module, inner) in expected.items():
        want = module.state_dict()[inner]
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            raise TaskConfigError(f"{source}: key model.{key} has shape {tuple(got.shape)}, the config builds "
                                  f"{tuple(want.shape)} {hint}")
        per_module.setdefault(id(module), {})[inner] = got.to(want.dtype)
    if not model.spec.tim:
        model.encoder.load_state_dict(per_module[id(model.encoder)], strict=True)
    model.head.load_state_dict(per_module.get(id(model.head), {}), strict=True)


def randomize_task_model(model: TaskModel, seed: int) -> None:
    """Seeded random weights for a --random-init task export (tests, benchmarks): the backbone as
    the base export randomises it; necks, decoder and head including BatchNorm statistics."""
    from ..weights import randomize

    if not model.spec.tim:  # a TiM backbone got its seeded weights when it was built
        randomize(model.encoder, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.head.state_dict().items():
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            noise = torch.randn(tensor.shape, generator=gen)
            if name.endswith("running_var"):
                value = 0.5 + torch.rand(tensor.shape, generator=gen)
            elif name.endswith(("norm.weight", "ln.weight")) or (tensor.dim() == 1 and name.endswith("weight")):
                value = 1.0 + 0.1 * noise
            else:
                fan_in = tensor[0].numel() if tensor.dim() > 1 else 50
                value = noise * min(0.1, fan_in ** -0.5)
            tensor.copy_(value)
