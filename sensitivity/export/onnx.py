"""ONNX export with QuantizeLinear/DequantizeLinear (TensorRT's explicit quantization).

Weights get per-channel symmetric int8 Q/DQ, activations per-tensor Q/DQ before each quantized layer,
SmoothQuant's unfolded divisions a Mul, excluded layers plain float. Opset 13+ (per-channel Q/DQ), a dynamic
batch dimension, and node names carrying the module path (`/layer1/layer1.0/conv1/Conv`), which
`trtexec --layerPrecisions` can address. Any output structure (dicts, nested tuples) is flattened to named
graph outputs.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensitivity.capture.outputs import flatten_outputs
from sensitivity.errors import SensitivityError
from sensitivity.errors import describe_exception as _exc
from sensitivity.export.errors import ExportError
from sensitivity.quant.build import quant_layers

__all__ = ["MIN_OPSET", "check_opset", "export_onnx", "flat_outputs", "graph_inputs", "max_opset"]


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


def graph_inputs(example: Any) -> tuple[list[str], tuple[torch.Tensor, ...]]:
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
        raise ExportError(
            f"--opset must be between {MIN_OPSET} (per-channel QuantizeLinear) and {top}, got {opset}"
        )
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
    input_names, args = graph_inputs(example)
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
