"""tm_runtime: run TerraMind exports with numpy and onnxruntime (no torch)."""
from .manifest import FORMAT_VERSION, ManifestError, load_manifest
from .runtime import TerraMindRuntime

__version__ = "0.1.0"
__all__ = ["TerraMindRuntime", "load_manifest", "ManifestError", "FORMAT_VERSION", "__version__"]
