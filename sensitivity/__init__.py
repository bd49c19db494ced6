"""sensitivity: layer-wise quantization sensitivity for PyTorch CNNs and LiDAR detectors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sensitivity.errors import SensitivityError

if TYPE_CHECKING:
    from sensitivity.apply import apply_policy, load_quantized
    from sensitivity.policy import load_policy
    from sensitivity.quant.spec import QuantSpec
    from sensitivity.scan import ScanOptions, ScanResult, scan

__version__ = "0.1.0"

__all__ = [
    "QuantSpec",
    "ScanOptions",
    "ScanResult",
    "SensitivityError",
    "__version__",
    "apply_policy",
    "load_policy",
    "load_quantized",
    "scan",
]

_LAZY = {
    "QuantSpec": ("sensitivity.quant.spec", "QuantSpec"),
    "apply_policy": ("sensitivity.apply", "apply_policy"),
    "load_quantized": ("sensitivity.apply", "load_quantized"),
    "scan": ("sensitivity.scan", "scan"),
    "ScanOptions": ("sensitivity.scan", "ScanOptions"),
    "ScanResult": ("sensitivity.scan", "ScanResult"),
    "load_policy": ("sensitivity.policy", "load_policy"),
}


def __getattr__(name: str) -> Any:
    # torch, pandas and the rest load on first use: `import sensitivity` (and sensitivity.report) stay light.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
