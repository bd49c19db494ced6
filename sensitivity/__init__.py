"""sensitivity: layer-wise quantization sensitivity for PyTorch."""
