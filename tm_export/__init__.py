"""tm_export: the PyTorch reference of TerraMind and its export to separate ONNX graphs."""
