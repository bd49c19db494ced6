"""ONNX export with QuantizeLinear/DequantizeLinear (TensorRT's explicit quantization), checked in ORT.

Weights get per-channel symmetric int8 Q/DQ, activations per-tensor Q/DQ before each quantized layer,
SmoothQuant's unfolded divisions a Mul, excluded layers plain float. Opset 13+ (per-channel Q/DQ), a
dynamic batch dimension, and node names carrying the module path (`/layer1/layer1.0/conv1/Conv`), which
`trtexec --layerPrecisions` can address. Verification runs ONNX Runtime twice: with graph optimisations
off (Q/DQ computed as written: parity with the torch fake-quant model) and on (Q/DQ fused into real int8
kernels: the fake-quant vs real-int8 gap).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sensitivity.errors import SensitivityError
from sensitivity.quant.build import quant_layers

__all__ = [
    "BEVDensePart",
    "ExportError",
    "bev_input",
    "export_onnx",
    "has_bev_dense_part",
    "sparse_scales",
    "tensorrt_warnings",
    "verify_onnx",
]

log = logging.getLogger(__name__)


class ExportError(SensitivityError):
    """The quantized model cannot be exported as asked (bits, dynamic smoothing, missing onnx)."""


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


def _check_exportable(qmodel: nn.Module) -> None:
    for name, m in quant_layers(qmodel).items():
        if not m.input_quantizer.enabled:
            continue
        bits = {m.input_quantizer.num_bits, m.weight_quantizer.num_bits}
        if bits != {8}:
            raise ExportError(
                f"ONNX Q/DQ export supports 8-bit quantizers only; layer {name} uses {sorted(bits)} bits "
                "(keep W4/A4 results for analysis, or rescan with --spec W8A8)"
            )
        if m.dynamic_alpha is not None:
            raise ExportError(
                f"layer {name} uses dynamic SmoothQuant (research only): it has no static ONNX form"
            )


def _names(example: Any) -> tuple[list[str], tuple[torch.Tensor, ...]]:
    args = example if isinstance(example, tuple) else (example,)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise ExportError(
            "ONNX export needs tensor inputs (dict batches such as OpenPCDet's are not exportable whole)"
        )
    return [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))], args


def export_onnx(
    qmodel: nn.Module,
    example: Any,
    path: str | os.PathLike[str],
    opset: int = 17,
    output_names: list[str] | None = None,
) -> Path:
    """Export `qmodel` (from apply_policy) to `path` with Q/DQ nodes and a dynamic batch dimension."""
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx extra: pip install 'sensitivity[onnx]'") from exc
    if opset < 13:
        raise ExportError(f"per-channel QuantizeLinear needs opset >= 13, got {opset}")
    _check_exportable(qmodel)
    input_names, args = _names(example)
    path = Path(path)
    with torch.no_grad():
        out = qmodel(*args)
    n_out = len(out) if isinstance(out, (tuple, list)) else 1
    if output_names is None or len(output_names) != n_out:
        output_names = [f"output{i}" for i in range(n_out)] if n_out > 1 else ["output"]
    dynamic = {n: {0: "batch"} for n in [*input_names, *output_names]}
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # dynamo=False on purpose: the TorchScript exporter turns fake-quantize ops into Q/DQ pairs
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                qmodel, args, str(tmp), dynamo=False, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic, do_constant_folding=True,
            )  # fmt: skip
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def verify_onnx(path: str | os.PathLike[str], qmodel: nn.Module, inputs: list[Any]) -> dict[str, Any]:
    """Max |ORT - torch| with Q/DQ computed as written (parity) and with ORT's int8 kernels (the gap)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("verifying the export needs onnxruntime: pip install 'sensitivity[onnx]'") from exc
    sessions = {}
    for label, level in (("reference", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                         ("int8_kernels", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):  # fmt: skip
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.log_severity_level = 3
        sessions[label] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    worst = {"reference": 0.0, "int8_kernels": 0.0}
    ref_scale = 0.0
    for example in inputs:
        names, args = _names(example)
        with torch.no_grad():
            out = qmodel(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        feed = {n: a.numpy() for n, a in zip(names, args, strict=True)}
        for label, sess in sessions.items():
            got = sess.run(None, feed)
            for o, g in zip(outs, got, strict=True):
                worst[label] = max(worst[label], float(np.abs(o.numpy() - g).max()))
        ref_scale = max(ref_scale, max(float(o.abs().max()) for o in outs))
    return {
        "max_abs_diff_qdq_reference": worst["reference"],
        "max_abs_diff_int8_kernels": worst["int8_kernels"],
        "output_absmax": ref_scale,
        "qdq_nodes": _count_qdq(path),
    }


def _count_qdq(path: str | os.PathLike[str]) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path))
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in (
            "QuantizeLinear",
            "DequantizeLinear",
            "Conv",
            "Gemm",
            "MatMul",
            "Mul",
            "ConvTranspose",
        ):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


class BEVDensePart(nn.Module):
    """The dense part of an OpenPCDet-style detector, from the BEV map to the head outputs: `backbone_2d`
    (reads `spatial_features`, writes `spatial_features_2d`) then the CenterHead's `shared_conv` and
    `heads_list` (its box decoding and NMS are left out). Submodule names stay OpenPCDet's, so the ONNX
    node names match the policy's layer names (`/dense_head/heads_list.0/hm/...`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone_2d = model.backbone_2d  # type: ignore[assignment]
        self.dense_head = model.dense_head  # type: ignore[assignment]
        # a new Module starts in training mode, and torch.onnx.export restores the mode it found: that
        # would leave the shared (unfolded) BatchNorms of `model` in training mode after the export
        self.train(model.training)

    def forward(self, spatial_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        data = self.backbone_2d(
            {"spatial_features": spatial_features, "batch_size": spatial_features.shape[0]}
        )
        x = self.dense_head.shared_conv(data["spatial_features_2d"])
        outs: list[torch.Tensor] = []
        for head in self.dense_head.heads_list:
            outs.extend(head(x).values())
        return tuple(outs)

    def output_names(self, x: torch.Tensor) -> list[str]:
        with torch.no_grad():
            y = self.dense_head.shared_conv(
                self.backbone_2d({"spatial_features": x, "batch_size": 1})["spatial_features_2d"]
            )
            return [f"task{i}.{k}" for i, head in enumerate(self.dense_head.heads_list) for k in head(y)]


def bev_input(qmodel: nn.Module, batch: Any) -> torch.Tensor:
    """The BEV map (`spatial_features`) `qmodel` computes for `batch`: the dense part's example input."""
    from sensitivity.data import run_model

    seen: list[torch.Tensor] = []
    handle = qmodel.backbone_2d.register_forward_pre_hook(lambda _m, a: seen.append(a[0]["spatial_features"]))
    try:
        with torch.no_grad():
            run_model(qmodel, batch)
    finally:
        handle.remove()
    if not seen:
        raise ExportError("the model never ran backbone_2d: no BEV map to export the dense part from")
    return seen[0].detach()


def has_bev_dense_part(model: nn.Module) -> bool:
    head = getattr(model, "dense_head", None)
    return hasattr(model, "backbone_2d") and hasattr(head, "shared_conv") and hasattr(head, "heads_list")


def sparse_scales(qmodel: nn.Module) -> dict[str, Any]:
    """Per sparse-conv layer, what an engine needs to run it in int8 (sparse convs have no standard ONNX
    form): input amax / scale / bits / sign, weight amax / scale per output channel (layout
    [Cout, k..., Cin], axis 0), the SmoothQuant factors where the input division stays a multiply, and
    whether the layer is kept in FP."""
    from sensitivity.quant.modules import is_spconv_module

    layers: dict[str, Any] = {}
    for name, m in quant_layers(qmodel).items():
        if not is_spconv_module(m):
            continue
        iq, wq = m.input_quantizer, m.weight_quantizer
        entry: dict[str, Any] = {
            "type": type(m).__name__.removeprefix("Quant"),
            "quantized": bool(iq.enabled),
        }
        if iq.enabled:
            entry.update(
                input_bits=iq.num_bits, input_unsigned=iq.unsigned, input_amax=float(iq.amax),
                input_scale=float(iq.scale()), weight_bits=wq.num_bits, weight_layout="Cout,k...,Cin",
                weight_axis=0, weight_amax=wq.amax.tolist(), weight_scale=wq.scale().tolist(),
            )  # fmt: skip
            sm = m.smoother
            if sm is not None and not sm.folded:
                entry["input_multiplier"] = (1.0 / sm.scale).tolist()  # per input channel, before quantizing
        layers[name] = entry
    return {"format": "sensitivity-sparse-scales", "version": 1, "layers": layers}
