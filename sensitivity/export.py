"""ONNX export with QuantizeLinear/DequantizeLinear (TensorRT's explicit quantization), checked in ORT.

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

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


#: Parity tolerance, a fraction of a tensor's max |value|: ORT and torch computing the same ops on the same
#: inputs differ only by float summation order (measured: <= 3e-7 of the outputs of a 64-conv YOLOv8n and
#: <= 2e-6 of any of its layers; 1e-7 on small models), while a real difference (a Q/DQ torch has not, a
#: scale, an op exported otherwise) moves a tensor by about one quantization step, ~1/127 of its range.
PARITY_RTOL = 1e-4


@dataclass(frozen=True)
class _Site:
    """Where a quantized layer sits in the ONNX graph (tensor names)."""

    input: str  # what the layer receives: before its SmoothQuant Mul and input Q/DQ
    q_input: str | None  # what its input QuantizeLinear reads (None: no input Q/DQ)
    output: str  # the Conv / ConvTranspose / Gemm output


def _layer_sites(graph: Any, qmodel: nn.Module) -> dict[str, _Site]:
    """Each quantized layer's tensors in the exported graph, found from its weight initializer
    (`<layer>.weight`, the parameter name the exporter keeps) through its weight Q/DQ to the Conv / Gemm,
    then back from that node's data input through the input Q/DQ (and the unfolded SmoothQuant Mul).
    Layers that cannot be located unambiguously are left out."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    sites = {}
    for name, layer in quant_layers(qmodel).items():
        users = consumers.get(f"{name}.weight", [])
        if len(users) == 1 and users[0].op_type == "QuantizeLinear":
            dq = consumers.get(users[0].output[0], [])
            users = consumers.get(dq[0].output[0], []) if len(dq) == 1 else []
        if len(users) != 1 or users[0].op_type not in ("Conv", "ConvTranspose", "Gemm"):
            continue
        node = users[0]
        x, q_input = node.input[0], None
        dq_node = producer.get(x)
        q_node = producer.get(dq_node.input[0]) if dq_node is not None else None
        if layer.input_quantizer.enabled and dq_node is not None and dq_node.op_type == "DequantizeLinear":
            if q_node is None or q_node.op_type != "QuantizeLinear":
                continue
            x = q_input = q_node.input[0]
            if layer.smoother is not None and not layer.smoother.folded:
                mul = producer.get(x)
                if mul is None or mul.op_type != "Mul":
                    continue
                x = mul.input[0]
        sites[name] = _Site(x, q_input, node.output[0])
    return sites


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| as a fraction of max |b|."""
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30) if b.numel() else 0.0


def _rel_per_channel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| as a fraction of max |b|, per channel (dim 1) of a model output: one output tensor may
    mix units (YOLOv8's [N, 4 + C, A] holds pixels and probabilities), and a difference in a small-valued
    channel must not hide behind a large one. Each channel's range counts as at least 1e-3 of the whole
    tensor's (a channel of near-zeros is compared on that scale)."""
    if b.dim() < 2 or b.shape[1] < 2 or not b.numel():
        return _rel(a, b)
    dims = [d for d in range(b.dim()) if d != 1]
    diff = (a - b).abs().amax(dim=dims)
    rng = b.abs().amax(dim=dims)
    rng = torch.maximum(rng, 1e-3 * rng.max()).clamp_min(1e-30)
    return float((diff / rng).max())


def _reference_session(model: Any) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _free_running(
    qmodel: nn.Module, layers: dict[str, Any], names: list[str], args: tuple[torch.Tensor, ...]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """torch on its own: each named layer's quantizer input (in execution order) and how often it ran."""
    seen: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = dict.fromkeys(names, 0)

    def count(name: str) -> None:
        calls[name] += 1

    def keep(name: str, x: torch.Tensor) -> None:
        seen.setdefault(name, x.detach().clone())

    handles = []
    for name in names:
        handles.append(layers[name].register_forward_pre_hook(lambda _m, _a, n=name: count(n)))
        handles.append(
            layers[name].input_quantizer.register_forward_pre_hook(lambda _m, a, n=name: keep(n, a[0]))
        )
    try:
        with torch.no_grad():
            qmodel(*args)
    finally:
        for h in handles:
            h.remove()
    return seen, calls


def _forced(
    qmodel: nn.Module,
    layers: dict[str, Any],
    sites: dict[str, _Site],
    ort_t: dict[str, torch.Tensor],
    args: tuple[torch.Tensor, ...],
) -> tuple[Any, list[tuple[str, str, float]]]:
    """torch with every layer fed ORT's input for it: the output, and in execution order how far the
    input torch computed for each layer itself ("input") and the layer's output ("layer") are from ORT's
    (fractions of ORT's range)."""
    events: list[tuple[str, str, float]] = []

    def feed(name: str, a: tuple[Any, ...]) -> tuple[Any, ...] | None:
        ref = ort_t[sites[name].input]
        if ref.shape != a[0].shape:  # not the tensor torch feeds this layer: a difference of its own
            events.append(("input", name, float("inf")))
            return None
        events.append(("input", name, _rel(a[0], ref)))
        return (ref, *a[1:])

    def compare(name: str, out: torch.Tensor) -> None:
        ref = ort_t[sites[name].output]
        events.append(("layer", name, _rel(out, ref) if ref.shape == out.shape else float("inf")))

    handles = []
    for name in sites:
        handles.append(layers[name].register_forward_pre_hook(lambda _m, a, n=name: feed(n, a)))
        handles.append(layers[name].register_forward_hook(lambda _m, _a, o, n=name: compare(n, o)))
    try:
        with torch.no_grad():
            out = qmodel(*args)
    finally:
        for h in handles:
            h.remove()
    return out, events


def _first_flip(
    layers: dict[str, Any],
    sites: dict[str, _Site],
    seen: dict[str, torch.Tensor],
    ort_t: dict[str, torch.Tensor],
) -> tuple[dict[str, Any] | None, int, int]:
    """Activation codes torch and ORT round differently in the free-running models: the first layer
    (execution order) where any do, how many of its codes, how far apart the two inputs were and how far
    the flipped values sat from a .5 tie (both in quantization steps); and the totals over all layers."""
    from sensitivity.quant.fake import quantize_codes

    first, flipped, codes = None, 0, 0
    for name, x_t in seen.items():
        site, iq = sites.get(name), layers[name].input_quantizer
        if site is None or site.q_input is None or not iq.enabled:
            continue
        scale = iq.scale()
        x_o = ort_t[site.q_input]
        c_t = quantize_codes(x_t, scale, iq.num_bits, iq.unsigned)
        diff = c_t != quantize_codes(x_o, scale, iq.num_bits, iq.unsigned)
        n_diff = int(diff.sum())
        flipped, codes = flipped + n_diff, codes + diff.numel()
        if n_diff and first is None:
            y = x_t[diff] / scale
            first = {
                "layer": name,
                "codes": n_diff,
                "of": diff.numel(),
                "input_diff_steps": float((x_t - x_o).abs().max() / scale),
                "tie_distance_steps": float((y - y.floor() - 0.5).abs().max()),
            }
    return first, flipped, codes


def _local_check(path: str | os.PathLike[str], qmodel: nn.Module, inputs: list[Any]) -> dict[str, Any]:
    """Layer by layer: every located quantized layer of `qmodel` runs on ORT's input for it (Q/DQ as
    written), so each layer, the ops between layers and those after the last are compared on the same
    inputs: a difference there is real, not inherited. Also finds the first activation code that the
    free-running models round differently, and how close to a .5 tie it sat."""
    import onnx

    model = onnx.load(str(path))
    layers = quant_layers(qmodel)
    sites = _layer_sites(model.graph, qmodel)
    n_outputs = len(model.graph.output)
    known = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for t in sorted({t for s in sites.values() for t in (s.input, s.q_input, s.output) if t} - known):
        model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    sess = _reference_session(model.SerializeToString())
    out_names = [o.name for o in sess.get_outputs()]
    worst_layer, worst_input, worst_output = (0.0, ""), (0.0, ""), 0.0
    first: dict[str, Any] | None = None
    first_off: dict[str, Any] | None = None
    flipped = codes = 0
    for example in inputs:
        names, args = _names(example)
        feed = {n: a.numpy() for n, a in zip(names, args, strict=True)}
        got = dict(zip(out_names, sess.run(None, feed), strict=True))
        ort_t = {k: torch.from_numpy(np.asarray(v)) for k, v in {**feed, **got}.items()}
        seen, calls = _free_running(qmodel, layers, list(sites), args)
        once = {n: s for n, s in sites.items() if calls[n] == 1}  # a layer run twice has two sites
        flip, n_flipped, n_codes = _first_flip(layers, once, seen, ort_t)
        first = first or flip
        flipped, codes = flipped + n_flipped, codes + n_codes
        out, events = _forced(qmodel, layers, once, ort_t, args)
        worst_layer = max([worst_layer, *((v, k) for what, k, v in events if what == "layer")])
        worst_input = max([worst_input, *((v, k) for what, k, v in events if what == "input")])
        first_off = first_off or next(
            ({"where": what, "layer": k, "rel_diff": v} for what, k, v in events if v > PARITY_RTOL), None
        )
        outs = list(flatten_outputs(out).values())
        for o, k in zip(outs, out_names[:n_outputs], strict=True):
            worst_output = max(worst_output, _rel_per_channel(o, ort_t[k]))
    return {
        "layers_located": len(sites),
        "layers": len(layers),
        "worst_layer_rel_diff": worst_layer[0],
        "worst_layer": worst_layer[1],
        "worst_layer_input_rel_diff": worst_input[0],
        "worst_layer_input": worst_input[1],
        "output_rel_diff": worst_output,
        "first_difference": first_off,
        "first_flipped_code": first,
        "flipped_codes": flipped,
        "codes": codes,
    }


def _verdict(check: dict[str, Any]) -> tuple[str, str]:
    tol = PARITY_RTOL
    if check["output_rel_diff_qdq_reference"] <= tol:
        return "ok", f"ORT and torch agree to float rounding (within {tol:g} of each output channel's range)"
    local = check.get("local_check")
    if local is None:
        return "mismatch", f"ORT and torch differ by more than {tol:g} of an output channel's range"
    if not local["layers_located"]:
        return (
            "mismatch",
            "ORT and torch differ, and no quantized layer could be located in the graph to say where",
        )
    off = local["first_difference"]
    if off is not None:
        what = (
            f"layer {off['layer']} computes otherwise given ORT's input"
            if off["where"] == "layer"
            else f"the ops feeding layer {off['layer']} compute otherwise"
        )
        return "mismatch", f"{what} ({off['rel_diff']:.2g} of its range)"
    if local["output_rel_diff"] > tol:
        return "mismatch", (
            f"the ops after the last quantized layers compute otherwise ({local['output_rel_diff']:.2g} of an "
            "output channel's range)"
        )
    worst = max(local["worst_layer_rel_diff"], local["worst_layer_input_rel_diff"], local["output_rel_diff"])
    flip = local["first_flipped_code"]
    tie = "" if flip is None else f"{flip['tie_distance_steps']:.1g} steps away"
    tie = "exactly on it" if flip is not None and flip["tie_distance_steps"] == 0 else tie
    cause = (
        "no activation code rounds differently: the gap builds up in float"
        if flip is None
        else f"{flip['codes']} of {flip['of']} activation codes at {flip['layer']}'s input round to the other "
        f"side of a .5 tie ({tie}; the two float summation orders put the inputs "
        f"{flip['input_diff_steps']:.1g} steps apart), and the flips cascade "
        f"({local['flipped_codes']} of {local['codes']} codes differ)"
    )
    located = local["layers_located"]
    of = "" if located == local["layers"] else f" (of {local['layers']})"
    return "ok", (
        f"given the same inputs, each of {located} located layers{of} and the ops between them agree "
        f"to {worst:.1g} of their range; {cause}"
    )


def verify_onnx(
    path: str | os.PathLike[str], qmodel: nn.Module, inputs: list[Any], *, local_check: bool | None = None
) -> dict[str, Any]:
    """Max |ORT - torch| with Q/DQ computed as written (parity) and with ORT's optimisations on (Q/DQ
    fused into int8 kernels where ORT can: the gap), and a verdict, "ok" or "mismatch".

    End to end, a deep quantized network does not agree bit for bit: a float summation order that
    differs in the last bit puts an occasional x/scale on the other side of a .5 rounding tie, that one
    code moves a whole step, and such flips cascade (a 64-conv YOLOv8n ends up 0.6 % apart, as far as
    torch with two different conv kernels). So when the outputs differ by more than `PARITY_RTOL` of
    their range, the verdict comes from the layer-by-layer check (`local_check`, also forced with True):
    every quantized layer runs on ORT's own input for it, and only a difference there is a mismatch."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError as exc:
        raise ExportError("verifying the export needs onnxruntime: pip install 'sensitivity[onnx]'") from exc
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp, "optimized.onnx"))
        try:
            sessions = {"reference": _reference_session(str(path))}
            sessions["int8_kernels"] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"ONNX Runtime cannot load the exported model: {_exc(exc)}") from exc
        fused = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    int8_nodes = sum(op.startswith("QLinear") or op.endswith("Integer") or op == "QGemm" for op in fused)
    worst = {"reference": 0.0, "int8_kernels": 0.0}
    ref_scale = rel = 0.0
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
                if label == "reference":
                    rel = max(rel, _rel_per_channel(torch.from_numpy(g), o))
        ref_scale = max(ref_scale, max(float(o.abs().max()) for o in outs))
    check: dict[str, Any] = {
        "max_abs_diff_qdq_reference": worst["reference"],
        "max_abs_diff_int8_kernels": worst["int8_kernels"],
        "output_absmax": ref_scale,
        "output_rel_diff_qdq_reference": rel,
        "int8_kernel_nodes": int8_nodes,
        "qdq_nodes": _count_qdq(path),
    }
    if local_check or (local_check is None and rel > PARITY_RTOL):
        check["local_check"] = _local_check(path, qmodel, inputs)
    check["verdict"], check["verdict_reason"] = _verdict(check)
    return check


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


class _HeadConvs(nn.Module):
    """A CenterHead's convs (`shared_conv`, then each task's `heads_list` entry) without its box decoding,
    called as one module so that the ONNX scopes, hence node names, start with `dense_head`."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.shared_conv = head.shared_conv  # type: ignore[assignment]
        self.heads_list = head.heads_list  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        x = self.shared_conv(x)
        return [head(x) for head in self.heads_list]


class BEVDensePart(nn.Module):
    """The dense part of an OpenPCDet-style detector, from the BEV map to the head outputs: `backbone_2d`
    (reads `spatial_features`, writes `spatial_features_2d`) then the CenterHead's `shared_conv` and
    `heads_list` (its box decoding and NMS are left out). Module and parameter names stay OpenPCDet's,
    and each part runs as a module call, so the ONNX node names carry the policy's layer names
    (`/dense_head/heads_list.0/hm/hm.1/Conv`, `/backbone_2d/deblocks.0/deblocks.0.0/ConvTranspose`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone_2d = model.backbone_2d  # type: ignore[assignment]
        self.dense_head = _HeadConvs(model.dense_head)
        # a new Module starts in training mode, and torch.onnx.export restores the mode it found: that
        # would leave the shared (unfolded) BatchNorms of `model` in training mode after the export
        self.train(model.training)

    def forward(self, spatial_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        data = self.backbone_2d(
            {"spatial_features": spatial_features, "batch_size": spatial_features.shape[0]}
        )
        return tuple(t for task in self.dense_head(data["spatial_features_2d"]) for t in task.values())

    def output_names(self, x: torch.Tensor) -> list[str]:
        with torch.no_grad():
            y = self.backbone_2d({"spatial_features": x, "batch_size": 1})["spatial_features_2d"]
            return [f"task{i}.{k}" for i, task in enumerate(self.dense_head(y)) for k in task]


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
