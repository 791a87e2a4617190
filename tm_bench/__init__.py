"""tm_bench: latency / throughput benchmarks for tm-deploy exports (``tm-bench``).

Kept apart from ``tm_runtime`` so that the runtime never pulls in torch: the ONNX Runtime
timing here needs only numpy + onnxruntime; torch, terratorch and ``tm_export`` are imported
lazily and only for ``--compare-torch``.
"""

__version__ = "0.1.0"
