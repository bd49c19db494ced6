"""sensitivity: layer-wise quantization sensitivity for PyTorch CNNs and LiDAR detectors.

The public API: `scan`, `apply_policy`, `load_policy`, `load_quantized`, `ScanResult`, `ScanOptions`,
`QuantSpec`. Each entry that takes a model first loads the integrations it needs (spconv's sparse convs
register themselves then), so the Python API works for every model the CLI does. Everything loads on
first use: `import sensitivity` stays light (no torch).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from sensitivity.errors import SensitivityError

if TYPE_CHECKING:
    from torch import nn

    from sensitivity.output import ScanResult
    from sensitivity.pipeline import ScanOptions
    from sensitivity.policy import Policy, load_policy
    from sensitivity.quant.state import QuantState
    from sensitivity.spec import QuantSpec

try:
    __version__ = importlib.metadata.version("sensitivity")
except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0"

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
    "QuantSpec": ("sensitivity.spec", "QuantSpec"),
    "ScanOptions": ("sensitivity.pipeline", "ScanOptions"),
    "ScanResult": ("sensitivity.output", "ScanResult"),
    "load_policy": ("sensitivity.policy", "load_policy"),
}


def scan(
    model: nn.Module, batches: Sequence[Any], options: ScanOptions | None = None, **kwargs: Any
) -> ScanResult:
    """Scan `model` on calibration `batches` (see `sensitivity.pipeline.scan` for the keyword arguments):
    per-layer isolated and cumulative error, the exclusion list, the per-layer policy, verified."""
    from sensitivity.integrations import activate
    from sensitivity.output import ScanResult
    from sensitivity.pipeline import scan as run

    return ScanResult.of(run(activate(model), batches, options, **kwargs))


def apply_policy(
    model: nn.Module, policy: Policy, quant_state: QuantState | dict, **kwargs: Any
) -> nn.Module:
    """The final quantized model for `policy` with a scan's calibrated state (see `sensitivity.apply`)."""
    from sensitivity.apply import apply_policy as run
    from sensitivity.integrations import activate

    return run(activate(model), policy, quant_state, **kwargs)


def load_quantized(path: Any, model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a saved `model_quant.pt` on the FP architecture `model_factory()` gives."""
    from sensitivity.apply import load_quantized as run
    from sensitivity.integrations import activate

    return run(path, lambda: activate(model_factory()))


def __getattr__(name: str) -> Any:
    # torch, pandas and the rest load on first use: `import sensitivity` (and sensitivity.report) stay light.
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sensitivity' has no attribute {name!r}")
