"""Optimisation profiles and buffer planning, derived from the manifest alone (no TensorRT needed).

Each graph input gets concrete (min, opt, max) shapes from its symbolic dims:

- ``batch``: the (min, opt, max) batch the user asks for (``tm-build-engines --batch``);
- ``num_tokens``: 196 x k tokens for k modalities in the encoder's context, k from 1 up to the
  largest context the export can produce: every input modality, plus, in chained generation,
  every output fed back to the encoder except the last (``max_context_modalities``);
- with coords: ``num_tokens`` widens by up to 3 coords tokens (an input, or a generated span
  fed back) and down to 1 (a coords-only input gives 3); ``seq_len`` (coords ids) is 1 to 3;
- ``num_queries`` (the shared decoder's queries): 196 for image targets, 1 to 3 for a coords
  output, so 1 to 196 when both are exported (static at 196 without coords);
- fixed dims as the manifest gives them (``context_emb``'s leading 1 stays 1).

Buffer planning gives every binding's byte size at the max profile (so buffers can be allocated
once) and the activation-sharing plan: graphs run one after another, so all execution contexts
can share one scratch allocation of the largest engine's ``device_memory_size``, as TensorRT's
diffusion demo does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from ..manifest import GraphEntry, Manifest, TensorSpec
from ..modalities import COORDS

Shape = tuple[int, ...]
Range = tuple[int, int, int]

DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1,
}


@dataclass(frozen=True)
class ProfileSettings:
    """``batch``: (min, opt, max). ``max_modalities`` / ``opt_modalities`` override the token range's
    k (default: derived from the manifest; opt = the number of exported input modalities)."""

    batch: Range = (1, 1, 4)
    max_modalities: int | None = None
    opt_modalities: int | None = None

    def __post_init__(self) -> None:
        check_range("batch", self.batch)


def check_range(what: str, r: Range) -> None:
    if len(r) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r):
        raise ValueError(f"{what}: expected three ints (min, opt, max), got {r!r}")
    lo, opt, hi = r
    if not 1 <= lo <= opt <= hi:
        raise ValueError(f"{what}: need 1 <= min <= opt <= max, got min={lo} opt={opt} max={hi}")


@dataclass(frozen=True)
class GraphProfile:
    """One graph's optimisation profile: each input's (min, opt, max) shape, and the symbolic dims'
    ranges used to size the outputs too."""

    graph: str
    inputs: dict[str, tuple[Shape, Shape, Shape]]
    dims: dict[str, Range] = field(default_factory=dict)

    @property
    def static(self) -> bool:
        """True when min == max for every input (one shape only: CUDA-graph capture is safe)."""
        return all(lo == hi for lo, _, hi in self.inputs.values())


def tokens_per_modality(manifest: Manifest) -> int:
    model = manifest.model
    if "tokens_per_modality" in model:
        return int(model["tokens_per_modality"])
    return (manifest.image_size // int(model.get("patch_size", 16))) ** 2


def max_context_modalities(manifest: Manifest) -> int:
    """The most modalities the encoder (and decoders) can see at once.

    ``embed`` feeds at most every input modality (M; a TiM backbone's TiM modalities count as
    inputs). Chained ``generate`` feeds the inputs plus
    every output except the last; outputs cannot also be inputs, and only targets with a
    token-embedding graph can be fed back. So the context is at most the union of input
    modalities and feedable targets, minus one when every target is in that union (the last
    output must then come from it). Never less than M. This is at most M + #targets - 1.
    """
    inputs = set(manifest.modalities)
    if manifest.data.get("tim"):  # a TiM backbone's encoder also reads the modalities it generated
        inputs |= set(manifest.data["tim"]["modalities"])
    m = len(inputs)
    targets = manifest.targets
    if not targets:  # (coords tokens are counted apart, in dim_ranges)
        return max(m, 1)
    feedable = {n for n, t in targets.items() if t.condition_graph}
    pool = inputs | feedable
    # a target that can take the last place: one that is never fed back, or a coords output
    spare_last = any(n not in pool for n in targets) or bool(manifest.coords and manifest.coords.output)
    return max(m, len(pool) if spare_last else len(pool) - 1, 1)


def dim_ranges(manifest: Manifest, settings: ProfileSettings) -> dict[str, Range]:
    n = tokens_per_modality(manifest)
    k_max = settings.max_modalities or max_context_modalities(manifest)
    k_opt = min(settings.opt_modalities or len(manifest.modalities) or 1, k_max)
    check_range("modalities (k)", (1, k_opt, k_max))
    dims = {"batch": tuple(settings.batch), "num_tokens": (n, n * k_opt, n * k_max)}
    longest = COORDS.max_length - 1  # three ids: an input's, or a generated span's
    if manifest.coords is not None:
        dims["num_tokens"] = (1, n * k_opt, n * k_max + longest)
        dims["seq_len"] = (1, longest, longest)
    coords_output = bool(manifest.coords and manifest.coords.output)
    if manifest.targets or coords_output:
        # The shared decoder's queries: an image target's N, or a coords sequence of 1 to 3.
        hi = n if manifest.targets else longest
        dims["num_queries"] = (1 if coords_output else hi, hi, hi)
    return dims


def _resolve(graph: str, spec: TensorSpec, dims: dict[str, Range], which: int) -> Shape:
    out = []
    for d in spec.shape:
        if isinstance(d, int):
            out.append(d)
        elif d in dims:
            out.append(dims[d][which])
        else:
            raise ValueError(f"graph {graph!r}, tensor {spec.name!r}: symbolic dim {d!r} has no profile rule "
                             f"(known: {', '.join(sorted(dims))})")
    return tuple(out)


def graph_profile(entry: GraphEntry, dims: dict[str, Range]) -> GraphProfile:
    inputs = {s.name: tuple(_resolve(entry.name, s, dims, i) for i in range(3)) for s in entry.inputs}
    used = {d for s in entry.inputs + entry.outputs for d in s.shape if isinstance(d, str)}
    return GraphProfile(entry.name, inputs, {d: dims[d] for d in sorted(used) if d in dims})


def graph_profiles(manifest: Manifest, settings: ProfileSettings | None = None,
                   graphs: list[str] | None = None) -> dict[str, GraphProfile]:
    """The optimisation profile of every graph (or of ``graphs``)."""
    dims = dim_ranges(manifest, settings or ProfileSettings())
    names = graphs if graphs is not None else list(manifest.graphs)
    return {name: graph_profile(manifest.graph(name), dims) for name in names}


def binding_bytes(spec: TensorSpec, shape: Shape) -> int:
    try:
        itemsize = DTYPE_BYTES[spec.dtype]
    except KeyError:
        raise ValueError(f"tensor {spec.name!r}: unknown dtype {spec.dtype!r}") from None
    return itemsize * prod(shape)


@dataclass(frozen=True)
class BindingPlan:
    name: str
    is_input: bool
    dtype: str
    max_shape: Shape
    nbytes: int


def buffer_plan(manifest: Manifest, profiles: dict[str, GraphProfile]) -> dict[str, list[BindingPlan]]:
    """Per graph, every binding (inputs then outputs) at the max profile, with its byte size."""
    plan: dict[str, list[BindingPlan]] = {}
    for name, prof in profiles.items():
        entry = manifest.graph(name)
        rows = []
        for is_input, specs in ((True, entry.inputs), (False, entry.outputs)):
            for s in specs:
                shape = _resolve(name, s, prof.dims, 2)
                rows.append(BindingPlan(s.name, is_input, s.dtype, shape, binding_bytes(s, shape)))
        plan[name] = rows
    return plan


def total_binding_bytes(plan: dict[str, list[BindingPlan]]) -> int:
    return sum(b.nbytes for rows in plan.values() for b in rows)


@dataclass(frozen=True)
class ActivationPlan:
    """One device allocation of ``shared_bytes`` serves every execution context in turn."""

    per_engine: dict[str, int]
    shared_bytes: int
    largest: str | None
    separate_bytes: int  # what one allocation per context would cost

    @property
    def saved_bytes(self) -> int:
        return self.separate_bytes - self.shared_bytes


def activation_plan(device_memory_sizes: dict[str, int], alignment: int = 256) -> ActivationPlan:
    """Graphs run one at a time on one stream, so their scratch memory never overlaps in time:
    share the max. Rounded up to ``alignment`` (TensorRT wants the device memory aligned;
    cudaMalloc already returns 256-byte aligned pointers)."""
    sizes = {k: int(v) for k, v in device_memory_sizes.items()}
    if any(v < 0 for v in sizes.values()):
        raise ValueError(f"negative device memory size in {sizes}")
    largest = max(sizes, key=sizes.__getitem__) if sizes else None
    shared = max(sizes.values(), default=0)
    shared = -(-shared // alignment) * alignment
    return ActivationPlan(sizes, shared, largest, sum(sizes.values()))


def format_plan(plan: dict[str, list[BindingPlan]], activations: ActivationPlan | None = None) -> str:
    """A small table for logs: graph, binding, max shape, MiB."""
    lines = []
    for graph, rows in plan.items():
        for b in rows:
            lines.append(f"{graph:24s} {'in ' if b.is_input else 'out'} {b.name:16s} {b.dtype:8s} "
                         f"{'x'.join(map(str, b.max_shape)):>20s} {b.nbytes / 2**20:9.2f} MiB")
    lines.append(f"bindings total: {total_binding_bytes(plan) / 2**20:.2f} MiB")
    if activations is not None:
        lines.append(f"activations: shared {activations.shared_bytes / 2**20:.2f} MiB (largest: {activations.largest}),"
                     f" {activations.separate_bytes / 2**20:.2f} MiB if separate")
    return "\n".join(lines)
