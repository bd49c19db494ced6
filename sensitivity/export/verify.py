"""Checking an exported graph in ONNX Runtime, with a verdict.

Runs ONNX Runtime twice: with graph optimisations off (Q/DQ computed as written: parity with the torch
fake-quant model) and on (Q/DQ fused into int8 kernels where ORT can; its CPU fusion wants a Q after the
layer too, so with TensorRT's placement it usually fuses none and this is a float-reordering gap). Where the
outputs differ, a layer-by-layer check says whether the graph computes otherwise or rounding ties
cascaded.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sensitivity.capture.outputs import flatten_outputs
from sensitivity.errors import describe_exception as _exc
from sensitivity.export.errors import ExportError
from sensitivity.export.onnx import graph_inputs as _names
from sensitivity.quant.build import quant_layers

__all__ = ["PARITY_RTOL", "verify_onnx"]


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
            sessions["int8_kernels"] = ort.InferenceSession(
                str(path), opts, providers=["CPUExecutionProvider"]
            )
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
