"""ONNX export with QuantizeLinear/DequantizeLinear (TensorRT's explicit quantization), checked in ORT.

Weights get per-channel symmetric int8 Q/DQ, activations per-tensor Q/DQ before each quantized layer,
SmoothQuant's unfolded divisions a Mul, excluded layers plain float. Opset 13+ (per-channel Q/DQ), a
dynamic batch dimension, and node names carrying the module path (`/layer1/layer1.0/conv1/Conv`), which
`trtexec --layerPrecisions` can address. Verification runs ONNX Runtime twice: with graph optimisations
off (Q/DQ computed as written: parity with the torch fake-quant model) and on (Q/DQ fused into real int8
kernels: the fake-quant vs real-int8 gap).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sensitivity.capture.outputs import flatten_outputs
from sensitivity.errors import SensitivityError
from sensitivity.files import atomic_write
from sensitivity.load import _exc
from sensitivity.quant.build import quant_layers
from sensitivity.quant.modules import is_spconv_module

__all__ = [
    "MIN_OPSET",
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


#: Opsets the TorchScript exporter (which turns fake-quantize ops into Q/DQ) writes: per-channel
#: QuantizeLinear needs 13; torch's exporter stops at its own maximum.
MIN_OPSET = 13


def max_opset() -> int:
    from torch.onnx import _constants

    return int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 17))


def check_opset(opset: int) -> int:
    """The opset, or ExportError before anything is built or written."""
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise ExportError(f"--opset must be between {MIN_OPSET} (per-channel QuantizeLinear) and {top}, got {opset}")
    return opset


@contextlib.contextmanager
def _silenced_fds() -> Iterator[None]:
    """stdout and stderr of the process (file descriptors 1 and 2) go to a temp file while the block runs:
    torch's exporter prints its whole IR graph from C++ when it fails, a wall of text the one-line error
    already summarises."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


@contextlib.contextmanager
def flat_outputs(model: nn.Module) -> Iterator[Callable[..., list[str]]]:
    """While active, `model(*args)` returns its output flattened to a tuple of tensors (dicts, nested
    tuples, `.features`, in `flatten_outputs` order): ONNX graphs have a flat list of outputs. An instance
    `forward`, not a wrapper module, so node names keep the model's own module paths. Yields a function
    giving the outputs' names for some inputs."""
    inner = model.forward

    def forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(flatten_outputs(inner(*args, **kwargs)).values())

    def names(*args: Any) -> list[str]:
        with torch.no_grad():
            return list(flatten_outputs(inner(*args)))

    model.__dict__["forward"] = forward
    try:
        yield names
    finally:
        model.__dict__.pop("forward", None)


def export_onnx(
    qmodel: nn.Module,
    example: Any,
    path: str | os.PathLike[str],
    opset: int = 17,
    output_names: list[str] | None = None,
) -> Path:
    """Export `qmodel` (from apply_policy) to `path` with Q/DQ nodes and a dynamic batch dimension. Any
    output structure exports (flattened, named by its keys); a model ONNX cannot express raises
    ExportError in one line, and nothing is left at `path`."""
    try:
        import onnx  # noqa: F401
    except ImportError as exc:
        raise ExportError("ONNX export needs the onnx extra: pip install 'sensitivity[onnx]'") from exc
    check_opset(opset)
    _check_exportable(qmodel)
    input_names, args = _names(example)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with flat_outputs(qmodel) as flat_names, torch.no_grad(), warnings.catch_warnings(), _silenced_fds():
            names = flat_names(*args)
            if output_names is None or len(output_names) != len(names):
                output_names = [re.sub(r"[^A-Za-z0-9_.:-]", "_", n) for n in names]
            dynamic = {n: {0: "batch"} for n in [*input_names, *output_names]}
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # dynamo=False on purpose: the TorchScript exporter turns fake-quantize ops into Q/DQ pairs
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                qmodel, args, str(tmp), dynamo=False, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic, do_constant_folding=True,
            )  # fmt: skip
        os.replace(tmp, path)
    except SensitivityError:
        raise
    except Exception as exc:
        raise ExportError(f"ONNX export of the quantized model failed: {_exc(exc)}") from exc
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
        try:
            sessions[label] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot load the exported model: {_exc(exc)}") from exc
    worst = {"reference": 0.0, "int8_kernels": 0.0}
    ref_scale = 0.0
    for example in inputs:
        names, args = _names(example)
        with torch.no_grad():
            outs = list(flatten_outputs(qmodel(*args)).values())
        feed = {n: a.numpy() for n, a in zip(names, args, strict=True)}
        for label, sess in sessions.items():
            try:
                got = sess.run(None, feed)
            except Exception as exc:
                raise ExportError(f"ONNX Runtime cannot run the exported model: {_exc(exc)}") from exc
            for o, g in zip(outs, got, strict=True):
                worst[label] = max(worst[label], float(np.abs(o.numpy() - g).max()))
        ref_scale = max(ref_scale, max(float(o.abs().max()) for o in outs))
    return {
        "max_abs_diff_qdq_reference": worst["reference"],
        "max_abs_diff_int8_kernels": worst["int8_kernels"],
        "output_absmax": ref_scale,
        "qdq_nodes": _count_qdq(path),
    }


def export_and_verify(qmodel: nn.Module, example: Any, folder: Path, opset: int = 17) -> dict[str, Any]:
    """Write `model_quant.onnx` (for spconv models: the dense BEV part, plus `sparse_scales.json`) into
    `folder`, check it in ONNX Runtime and record the check in `export.json`, also when the export fails
    (then ExportError follows, after the record is written)."""
    record: dict[str, Any] = {"ok": False, "opset": opset}
    try:
        if example is None:
            raise ExportError("no example input in the quant state for ONNX export: pass --calib")
        target, names = qmodel, None
        if any(is_spconv_module(m) for m in qmodel.modules()):
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
            atomic_write(scales, lambda f: f.write((json.dumps(sparse_scales(qmodel), indent=2) + "\n").encode()))
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
