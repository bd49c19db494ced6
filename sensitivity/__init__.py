"""sensitivity: layer-wise quantization sensitivity for PyTorch CNNs and LiDAR detectors."""

from __future__ import annotations

from typing import Any

from sensitivity.errors import SensitivityError
from sensitivity.quant.spec import QuantSpec

__version__ = "0.1.0"

__all__ = ["QuantSpec", "ScanOptions", "ScanResult", "SensitivityError", "__version__", "load_policy", "scan"]

_LAZY = {
    "scan": ("sensitivity.scan", "scan"),
    "ScanOptions": ("sensitivity.scan", "ScanOptions"),
    "ScanResult": ("sensitivity.scan", "ScanResult"),
    "load_policy": ("sensitivity.policy", "load_policy"),
}


def __getattr__(name: str) -> Any:
    # pandas / policy code load on first use, so `import sensitivity` stays light.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
