"""Where weights come from: a local file, the Hugging Face hub (cache and offline aware), or
seeded random values for tests and benchmarks; and strict, key-naming loading."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

HUB_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "tiny": ("ibm-esa-geospatial/TerraMind-1.0-tiny", "TerraMind_v1_tiny.pt"),
    "small": ("ibm-esa-geospatial/TerraMind-1.0-small", "TerraMind_v1_small.pt"),
    "base": ("ibm-esa-geospatial/TerraMind-1.0-base", "TerraMind_v1_base.pt"),
    "large": ("ibm-esa-geospatial/TerraMind-1.0-large", "TerraMind_v1_large.pt"),
}


TOKENIZER_MODALITIES = ("S2L2A", "S1GRD", "S1RTC", "DEM", "NDVI", "LULC")
HUB_TOKENIZERS: dict[str, tuple[str, str]] = {
    m: (f"ibm-esa-geospatial/TerraMind-1.0-Tokenizer-{m}", f"TerraMind_Tokenizer_{m}.pt")
    for m in TOKENIZER_MODALITIES
}
# The coords "tokenizer" is a Hugging Face tokenizers vocabulary file, not weights.
HUB_TOKENIZERS["coords"] = ("ibm-esa-geospatial/TerraMind-1.0-Tokenizer-Coords", "config.json")


class WeightsError(RuntimeError):
    """Weights could not be found, read, or do not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A torch state_dict file (``.pt``/``.pth``, read with weights_only=True) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for non-checkpoint files
        raise WeightsError(f"could not read {path} as a torch state_dict: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # Lightning-style wrapper
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state_dict")
    return state


def hub_checkpoint(size: str) -> Path:
    """Path of the official backbone checkpoint in the HF cache, downloading it if allowed."""
    repo_id, filename = HUB_CHECKPOINTS[size]
    return hub_file(repo_id, filename, "--ckpt PATH")


def hub_tokenizer(modality: str) -> Path:
    """Path of the official tokenizer checkpoint of ``modality`` (HF cache or download)."""
    repo_id, filename = HUB_TOKENIZERS[modality]
    return hub_file(repo_id, filename, f"--tokenizer-ckpt {modality}=PATH")


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub's host opens (DNS + connect, at most ``timeout`` s).

    huggingface_hub retries a network error five times with backoff (~25 s of warnings) before
    it looks in the cache and gives up; this probe lets a machine without network go straight to
    the cache. Behind a proxy the host is not reachable directly: we then leave it to
    huggingface_hub (True)."""
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True
    url = urlsplit(endpoint)
    host, port = url.hostname, url.port or (80 if url.scheme == "http" else 443)
    if not host:
        return True
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_file(repo_id: str, filename: str, flag: str) -> Path:
    """Honours HF_HUB_OFFLINE and HF_HOME/HF_HUB_CACHE (huggingface_hub does). Fails with one
    clear message saying what to download, and which flag takes the file instead; without a
    network connection it fails at once (only the cache is looked at)."""
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError as exc:  # pragma: no cover - export extra installs it
        raise WeightsError("huggingface_hub is not installed; pip install 'tm-deploy[export]' or pass --ckpt") from exc
    offline = _offline()
    unreachable = not offline and not hub_reachable(constants.ENDPOINT)
    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename, local_files_only=unreachable))
    except Exception as exc:
        if offline:
            why = "offline mode (HF_HUB_OFFLINE) and the file is not in the cache"
        elif unreachable:
            why = (f"no network connection to {urlsplit(constants.ENDPOINT).hostname} and the file is not in the "
                   f"cache ({constants.HF_HUB_CACHE})")
        else:
            why = str(exc).splitlines()[0]
        raise WeightsError(
            f"could not get {filename} from the Hugging Face hub ({repo_id}): {why}. "
            f"Download https://huggingface.co/{repo_id}/blob/main/{filename} and pass {flag}, "
            "or use --random-init --seed N for a test export."
        ) from exc


def load_needed(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every key ``module`` needs from ``state``; ignore the rest (other modalities, decoder).

    A needed key that is missing, or has another shape, is an error naming it.
    """
    own = module.state_dict()
    # Shapes first: a wrong model size shows up as a mismatch, which says more than missing keys.
    for key, tensor in own.items():
        if key in state and tuple(state[key].shape) != tuple(tensor.shape):
            raise WeightsError(
                f"{source}: key {key} has shape {tuple(state[key].shape)}, the model expects {tuple(tensor.shape)} "
                "(is it a checkpoint of another model size?)"
            )
    missing = [k for k in own if k not in state]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(f"{source} lacks {len(missing)} key(s) this export needs: {shown}")
    module.load_state_dict({k: state[k].to(torch.float32) for k in own}, strict=True)


def randomize(module: nn.Module, seed: int) -> None:
    """Seeded random values for every parameter (not buffers: positions and zero biases stay).

    Norm weights are drawn around 1 and everything else around 0 with a small spread, so that
    activations stay in a realistic range through deep stacks; nothing is left at zero, which would
    hide wiring bugs.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = param.shape[-1] if param.ndim > 1 else 50
                param.copy_(noise * min(0.02, fan_in ** -0.5))


def random_state(state: dict[str, torch.Tensor], seed: int, keep: tuple[str, ...] = ("pos_emb",)) -> dict:
    """Seeded random values for a state_dict's floating tensors (for random-init tokenizers).

    Matrices and kernels are scaled by 1/sqrt(fan-in) and vectors named ``weight`` (norms) are
    drawn around 1, so activations stay finite through a 50-layer UNet; keys ending in ``keep``
    (the fixed positional tables) are left as built.
    """
    return {key: value for key, (_, value) in zip(state, random_values(state, seed, keep))}


def random_values(state: dict[str, torch.Tensor], seed: int, keep: tuple[str, ...] = ("pos_emb",)):
    """``random_state``'s values one at a time, as (tensor of ``state``, new value) pairs: the same
    tensor where it is kept. Copying each into place never holds two copies of the weights."""
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if not value.is_floating_point() or key.endswith(keep):
            yield value, value
            continue
        noise = torch.randn(value.shape, generator=gen)
        if value.dim() >= 2:
            yield value, noise / value[0].numel() ** 0.5
        elif key.endswith("weight"):
            yield value, 1.0 + 0.2 * noise
        else:
            yield value, 0.1 * noise
