"""Quantization leaves: spec, fake quantization, quantizer module, calibrators, quantized layers."""

from sensitivity.quant.fake import amax_to_scale, fake_quant, quantize_codes
from sensitivity.quant.modules import QUANT_MODULES
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.quant.registry import quant_class_for
from sensitivity.spec import CALIBRATORS, QuantSpec, qrange

__all__ = [
    "CALIBRATORS",
    "QUANT_MODULES",
    "QuantSpec",
    "TensorQuantizer",
    "amax_to_scale",
    "fake_quant",
    "qrange",
    "quant_class_for",
    "quantize_codes",
]
