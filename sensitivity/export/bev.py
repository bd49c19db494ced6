"""The dense part of an OpenPCDet-style detector, exported to ONNX where its sparse 3D backbone cannot be,
and the sparse layers' int8 scales written for the engine that runs them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sensitivity.export.errors import ExportError
from sensitivity.io.batches import run_model
from sensitivity.quant.build import quant_layers
from sensitivity.quant.registry import DENSE, family_of

__all__ = ["BEVDensePart", "bev_input", "has_bev_dense_part", "is_sparse", "sparse_scales"]


def is_sparse(module: nn.Module) -> bool:
    """A layer of a registered non-dense family (spconv): no standard ONNX form."""
    family = family_of(module)
    return family is not None and family is not DENSE


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
        if not is_sparse(m):
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
