"""The export's one error type (also raised where onnx / onnxruntime are missing)."""

from __future__ import annotations

from sensitivity.errors import SensitivityError

__all__ = ["ExportError"]


class ExportError(SensitivityError):
    """The quantized model cannot be exported as asked (bits, dynamic smoothing, missing onnx)."""
