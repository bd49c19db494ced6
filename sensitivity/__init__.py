"""sensitivity: layer-wise quantization sensitivity for PyTorch CNNs and LiDAR detectors."""

from __future__ import annotations

import sys
import types
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


class _Package(types.ModuleType):
    """Keeps `sensitivity.scan` the function: importing the submodule `sensitivity.scan` (which `from
    sensitivity import scan` itself does, lazily) would otherwise bind the module over that name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return  # the submodule stays in sys.modules (`from sensitivity.scan import ScanOptions`)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    # torch, pandas and the rest load on first use: `import sensitivity` (and sensitivity.report) stay light.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
