"""Engines behind one small protocol: ``run(graph_name, feeds, outputs) -> list[np.ndarray]``."""
from .onnxruntime import OrtBackend

__all__ = ["OrtBackend"]
