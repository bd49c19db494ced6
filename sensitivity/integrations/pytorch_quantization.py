"""NVIDIA pytorch-quantization interop: read its `_amax` checkpoints, write our final model in its layout.

pytorch-quantization's `QuantConv2d` / `QuantLinear` / ... hold `_input_quantizer` and `_weight_quantizer`
(`TensorQuantizer`s); a calibrated model's state dict is the FP model's plus, per layer,

- `<layer>._input_quantizer._amax`: per tensor, a 0-d float32 tensor (its max calibrator squeezes it);
- `<layer>._weight_quantizer._amax`: per output channel with the reduced dims kept (axis 0):
  [Cout, 1, 1, 1] for Conv2d, [Cout, 1] for Linear;
- `<layer>._{input,weight}_quantizer.clip.clip_value_{min,max}` only with `learn_amax` (the range in use).

Reading the layout (`sensitivity.io.pq_checkpoint`, used by `sensitivity.load`) and writing it
(`save_amax_state_dict`, here) need no import of pytorch-quantization; only `to_pytorch_quantization`,
which builds its modules, imports it. Its rounding differs from ours only at .5 ties: it rounds
x * (qmax / amax), we round x / (amax / qmax) as ONNX does (see `sensitivity.quant.fake`).

What a state dict cannot carry goes to a JSON sidecar beside it (`<name>.json`, see `sidecar_path`):
a state dict is meant for `load_state_dict(strict=True)`, so it holds tensors under module keys only.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sensitivity.errors import SensitivityError
from sensitivity.files import atomic_write
from sensitivity.quant.build import quant_layers
from sensitivity.quant.modules import QuantMixin

__all__ = [
    "SIDECAR_FORMAT",
    "UnfoldedSmoothingError",
    "save_amax_state_dict",
    "sidecar_path",
    "to_pytorch_quantization",
]

SIDECAR_FORMAT = "sensitivity-pytorch-quantization"


class UnfoldedSmoothingError(SensitivityError):
    """A layer's SmoothQuant multiply is not folded into its producer: pytorch-quantization has no such op."""


# ------------------------------------------------------------------------------------------------ read
# ----------------------------------------------------------------------------------------------- write
def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON written beside a state dict: `model_quant_pytorch_quantization.pt` -> `.json`."""
    return Path(path).with_suffix(".json")


def _refusals(layers: dict[str, QuantMixin]) -> list[str]:
    out = []
    for name, m in layers.items():
        if m.smoother is not None and not m.smoother.folded:
            out.append(name)
        elif m.dynamic_alpha is not None and m.input_quantizer.enabled:
            out.append(f"{name} (dynamic)")
    return out


def _input_amax(name: str, m: QuantMixin) -> Tensor:
    amax = m.input_quantizer.amax
    if amax is None or amax.numel() != 1:
        raise ValueError(f"layer {name}: expected a calibrated per-tensor input amax, got {amax!r}")
    return amax.detach().float().cpu().reshape(()).clone()


def _weight_amax(name: str, m: QuantMixin) -> tuple[Tensor, int]:
    """Per-channel weight amax with the reduced dims kept, as pytorch-quantization's calibrator stores it."""
    q = m.weight_quantizer
    if q.amax is None or q.axis is None:
        raise ValueError(f"layer {name}: expected a calibrated per-channel weight amax")
    axis = q.axis % m.weight.dim()
    shape = [1] * m.weight.dim()
    shape[axis] = -1
    return q.amax.detach().float().cpu().reshape(shape).clone(), axis


def save_amax_state_dict(qmodel: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write `qmodel` (from `apply_policy`) as a pytorch-quantization state dict, plus its JSON sidecar.

    The state dict holds the model's parameters and buffers under their original keys, weights as deployed
    (SmoothQuant's s multiplied in, the producer's 1/s already folded), and per quantized layer
    `<layer>._input_quantizer._amax` (0-d) and `<layer>._weight_quantizer._amax` (keepdims, e.g.
    [Cout, 1, 1, 1]); our own `input_quantizer.amax` / `weight_quantizer.amax` / `smoother.scale` keys are
    dropped. Layers kept in FP get no amax keys. The sidecar (`sidecar_path`) lists what the model to
    load into must match: `fp_layers` (plain modules, or quantizers disabled), `unsigned` (input
    quantizers built with `unsigned=True`), per layer the bits and weight axis (1 for transposed convs,
    not pytorch-quantization's default 0), and `folded_bn` (BatchNorms folded into the conv before it,
    so those keys are gone and the convs have a bias).

    Raises `UnfoldedSmoothingError` when a layer's SmoothQuant input multiply was not folded into a
    producer: pytorch-quantization's layers have nowhere to put it, and dropping it changes the model.
    Both files are replaced atomically; returns the state dict's path.
    """
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("save_amax_state_dict expects a quantized model made by apply_policy")
    refused = _refusals(layers)
    if refused:
        raise UnfoldedSmoothingError(
            f"SmoothQuant on {', '.join(refused)} is not folded into a producer layer, and "
            "pytorch-quantization's layers cannot express its per-channel input multiply: use "
            "--format native (model_quant.pt / --onnx), or set those layers to naive or fp in policy.yaml"
        )
    own = tuple(f"{n}.{sub}." for n in layers for sub in ("input_quantizer", "weight_quantizer", "smoother"))
    state: dict[str, Tensor] = {
        k: v.detach().cpu().clone() for k, v in qmodel.state_dict().items() if not k.startswith(own)
    }
    info: dict[str, Any] = {}
    fp_layers, unsigned = [], []
    for name, m in layers.items():
        state[f"{name}.weight"] = m.smoothed_weight().detach().cpu().clone()  # s is in the deployed weight
        quantized = m.input_quantizer.enabled or m.weight_quantizer.enabled
        if not quantized:
            fp_layers.append(name)
            continue
        entry: dict[str, Any] = {"module": m.float_class().__name__}
        if m.input_quantizer.enabled:
            state[f"{name}._input_quantizer._amax"] = _input_amax(name, m)
            entry["input"] = {"num_bits": m.input_quantizer.num_bits, "unsigned": m.input_quantizer.unsigned}
            if m.input_quantizer.unsigned:
                unsigned.append(name)
        if m.weight_quantizer.enabled:
            state[f"{name}._weight_quantizer._amax"], axis = _weight_amax(name, m)
            entry["weight"] = {"num_bits": m.weight_quantizer.num_bits, "axis": axis}
        if m.smoother is not None:
            entry["smoothquant"] = "folded into the producer; s is in this weight"
        info[name] = entry
    meta = getattr(qmodel, "sensitivity_meta", None) or {}
    path = Path(path)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "state_dict": path.name,
        "spec": meta.get("spec"),
        "folded_bn": dict(meta.get("folded_bn", {})),
        "fp_layers": fp_layers,
        "unsigned": unsigned,
        "layers": info,
    }
    # both written to temp files first (same filesystem), then moved together
    tmp_pt = str(atomic_write(path, lambda fh: torch.save(state, fh), keep_temp=True))
    try:
        side = sidecar_path(path)
        text = (json.dumps(sidecar, indent=2) + "\n").encode()
        tmp_js = str(atomic_write(side, lambda fh: fh.write(text), keep_temp=True))
        os.replace(tmp_js, side)
        os.replace(tmp_pt, path)
    finally:
        if os.path.exists(tmp_pt):
            os.unlink(tmp_pt)
    return path


# ----------------------------------------------------------------------- build pytorch-quantization modules
def _ctor_kwargs(m: nn.Module) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None}
    assert isinstance(m, nn.modules.conv._ConvNd)
    kwargs = {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": m.kernel_size,
        "stride": m.stride,
        "padding": m.padding,
        "dilation": m.dilation,
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }
    if m.transposed:
        kwargs["output_padding"] = m.output_padding
    return kwargs


def to_pytorch_quantization(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """A copy of `model` (the FP architecture; its weights are replaced) built from pytorch-quantization's
    `quant_nn` modules, with the state dict that `save_amax_state_dict` wrote at `path` loaded strictly.

    For users who continue in NVIDIA's toolkit (its QAT, its ONNX export), and the round-trip check that the
    layout means what we meant. Descriptors follow the sidecar (bits, unsigned inputs, weight axis); FP
    layers stay plain modules. The `_amax` buffers are created on the CPU before loading, since
    pytorch-quantization 2.1.3 calls `.cuda()` when it has to create them itself.
    """
    from pytorch_quantization import nn as quant_nn
    from pytorch_quantization.tensor_quant import QuantDescriptor

    side = sidecar_path(path)
    info = json.loads(side.read_text())
    if info.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{side} is not a {SIDECAR_FORMAT} sidecar")
    state = torch.load(path, map_location="cpu", weights_only=True)
    qmodel = copy.deepcopy(model).cpu().eval()
    for conv, bn in info["folded_bn"].items():  # structure only: the state dict brings the weights
        c = qmodel.get_submodule(conv)
        if c.bias is None:
            c.bias = nn.Parameter(torch.zeros(c.weight.shape[0]), requires_grad=False)
        parent, _, attr = bn.rpartition(".")
        setattr(qmodel.get_submodule(parent) if parent else qmodel, attr, nn.Identity())
    for name, entry in info["layers"].items():
        fp = qmodel.get_submodule(name)
        cls = getattr(quant_nn, f"Quant{type(fp).__name__}", None)
        if cls is None or not isinstance(fp, (nn.Linear, nn.modules.conv._ConvNd)):
            raise ValueError(f"layer {name}: pytorch-quantization has no quantized {type(fp).__name__}")
        inp, wgt = entry.get("input", {}), entry.get("weight", {})
        q = cls(
            **_ctor_kwargs(fp),
            quant_desc_input=QuantDescriptor(
                num_bits=inp.get("num_bits", 8), unsigned=bool(inp.get("unsigned", False))
            ),
            quant_desc_weight=QuantDescriptor(num_bits=wgt.get("num_bits", 8), axis=(wgt.get("axis", 0),)),
        )
        for sub, which in (("_input_quantizer", "input"), ("_weight_quantizer", "weight")):
            quantizer = getattr(q, sub)
            key = f"{name}.{sub}._amax"
            if which in entry and key in state:
                quantizer.register_buffer("_amax", torch.zeros_like(state[key]))
            else:
                quantizer.disable()
        parent, _, attr = name.rpartition(".")
        setattr(qmodel.get_submodule(parent) if parent else qmodel, attr, q)
    qmodel.load_state_dict(state, strict=True)
    return qmodel.eval()
