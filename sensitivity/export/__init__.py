"""The final model's exports: ONNX with QuantizeLinear/DequantizeLinear (TensorRT's explicit quantization),
checked in ONNX Runtime.

Weights get per-channel symmetric int8 Q/DQ, activations per-tensor Q/DQ before each quantized layer,
SmoothQuant's unfolded divisions a Mul, excluded layers plain float. Opset 13+ (per-channel Q/DQ), a
dynamic batch dimension, and node names carrying the module path (`/layer1/layer1.0/conv1/Conv`), which
`trtexec --layerPrecisions` can address. Verification runs ONNX Runtime twice: with graph optimisations
off (Q/DQ computed as written: parity with the torch fake-quant model) and on (Q/DQ fused into int8
kernels where ORT can; its CPU fusion wants a Q after the layer too, so with TensorRT's placement it
usually fuses none and this is a float-reordering gap). Where the outputs differ, a layer-by-layer check
says whether the graph computes otherwise or rounding ties cascaded (`verify_onnx`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from sensitivity.errors import SensitivityError
from sensitivity.export.bev import BEVDensePart, bev_input, has_bev_dense_part, is_sparse, sparse_scales
from sensitivity.export.errors import ExportError
from sensitivity.export.onnx import MIN_OPSET, check_opset, export_onnx, flat_outputs
from sensitivity.export.verify import PARITY_RTOL, verify_onnx
from sensitivity.files import atomic_write
from sensitivity.quant.build import quant_layers

__all__ = [
    "MIN_OPSET",
    "PARITY_RTOL",
    "BEVDensePart",
    "ExportError",
    "bev_input",
    "check_opset",
    "export_and_verify",
    "export_onnx",
    "flat_outputs",
    "has_bev_dense_part",
    "sparse_scales",
    "tensorrt_warnings",
    "verify_onnx",
]


def tensorrt_warnings(qmodel: nn.Module) -> list[str]:
    """Choices TensorRT cannot run, each with what to change."""
    warnings = []
    unsigned = [
        n for n, m in quant_layers(qmodel).items() if m.input_quantizer.enabled and m.input_quantizer.unsigned
    ]
    if unsigned:
        warnings.append(
            f"{len(unsigned)} layers use unsigned (uint8) activations (e.g. {unsigned[0]}): TensorRT runs only "
            "signed int8; rescan with --act-sign signed for a TensorRT engine"
        )
    return warnings


def export_and_verify(qmodel: nn.Module, example: Any, folder: Path, opset: int = 17) -> dict[str, Any]:
    """Write `model_quant.onnx` (for spconv models: the dense BEV part, plus `sparse_scales.json`) into
    `folder`, check it in ONNX Runtime and record the check in `export.json`, also when the export fails
    (then ExportError follows, after the record is written)."""
    record: dict[str, Any] = {"ok": False, "opset": opset}
    try:
        if example is None:
            raise ExportError("no example input in the quant state for ONNX export: pass --calib")
        target, names = qmodel, None
        if any(is_sparse(m) for m in qmodel.modules()):
            # sparse convs have no standard ONNX form: the dense part (BEV backbone + head) goes to ONNX,
            # the sparse layers' scales to JSON for the engine that runs them
            if not has_bev_dense_part(qmodel):
                raise ExportError(
                    "ONNX export of sparse convs is not possible; for OpenPCDet-style detectors the dense part "
                    "(backbone_2d + dense_head) is exported, but this model has no such modules"
                )
            example = bev_input(qmodel, example)
            target = BEVDensePart(qmodel)
            names = target.output_names(example)
            scales = folder / "sparse_scales.json"
            atomic_write(
                scales, lambda f: f.write((json.dumps(sparse_scales(qmodel), indent=2) + "\n").encode())
            )
            record["sparse_scales"] = scales.name
        path = export_onnx(target, example, folder / "model_quant.onnx", opset=opset, output_names=names)
        record["onnx"] = path.name
        record.update(verify_onnx(path, target, [example]))
        record["ok"] = True
    except SensitivityError as exc:
        record["error"] = str(exc)
        raise
    finally:
        text = json.dumps(record, indent=2) + "\n"
        atomic_write(folder / "export.json", lambda f: f.write(text.encode()))
    return record
