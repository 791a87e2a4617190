"""TensorRT deployment helpers: engine cache keys, optimisation profiles and buffer planning
(pure Python, CPU-testable), engine building (``tm-build-engines``) and comparison against ONNX
Runtime (``tm-compare-trt``). ``tensorrt`` and ``cuda-python`` are imported lazily inside the
functions that need them, so importing this package never requires a GPU stack."""
from .engine_cache import CacheLookup, EngineCache, EngineKeyParts, rebuild_reason
from .profiles import (ActivationPlan, GraphProfile, ProfileSettings, activation_plan, binding_bytes,
                       buffer_plan, graph_profiles)

__all__ = ["CacheLookup", "EngineCache", "EngineKeyParts", "rebuild_reason", "ActivationPlan", "GraphProfile",
           "ProfileSettings", "activation_plan", "binding_bytes", "buffer_plan", "graph_profiles"]
