"""Prepare the FP reference: a deepcopy in eval mode, BN folded into convs, target layers found in order."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from sensitivity.data import Batch, batch_to
from sensitivity.errors import NoQuantizableLayersError
from sensitivity.graph import Dataflow, record_dataflow
from sensitivity.policy.glob import glob_match
from sensitivity.quant.modules import QUANT_MODULES, is_spconv_module, quant_class_for

__all__ = ["LayerInfo", "Prepared", "find_targets", "fold_bn_", "fuse_pair_", "is_target", "prepare"]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_target(module: nn.Module) -> bool:
    """Conv / ConvTranspose / Linear of exactly the torch type (subclasses have their own forward), or a
    spconv convolution (SubMConv3d, SparseConv3d, SparseInverseConv3d, ...)."""
    return type(module) in QUANT_MODULES or (is_spconv_module(module) and quant_class_for(module) is not None)


@dataclass
class LayerInfo:
    """What the report says about one target layer (shapes of its first call; MACs per sample)."""

    name: str
    type: str
    order: int
    weight_shape: tuple[int, ...]
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    macs: int = 0
    calls: int = 0
    folded_bn: str = ""


@dataclass
class Prepared:
    model: nn.Module
    layers: list[LayerInfo]
    flow: Dataflow
    folded: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def find_targets(model: nn.Module, only: list[str] | None = None, skip: list[str] | None = None) -> list[str]:
    """Target layer names (module-tree order), filtered by `only` / `skip` glob lists."""
    names = []
    for name, mod in model.named_modules():
        if not name or not is_target(mod):
            continue
        if only and not any(glob_match(p, name) for p in only):
            continue
        if skip and any(glob_match(p, name) for p in skip):
            continue
        names.append(name)
    return names


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _foldable(module: nn.Module | None) -> bool:
    """Conv1d/2d/3d, Linear, or a spconv conv (weight [Cout, k..., Cin]: output channels first, as here)."""
    if module is None:
        return False
    if type(module) in _FOLDABLE:
        return True
    if is_spconv_module(module):
        from sensitivity.integrations.spconv import is_sparse_conv

        return is_sparse_conv(module)
    return False


def fuse_pair_(model: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold BN `bn_name` into `conv_name` in place (the BN becomes Identity). Deterministic: applying the
    scan's recorded pairs to a fresh copy of the same model gives bit-identical weights."""
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    if isinstance(bn, nn.Identity):
        return  # already folded
    assert isinstance(bn, _BN) and bn.running_mean is not None and bn.running_var is not None
    if isinstance(conv, nn.Linear):
        w, b = fuse_linear_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
    else:
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        w, b = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, gamma, beta
        )
    conv.weight = nn.Parameter(w.detach(), requires_grad=False)
    conv.bias = nn.Parameter(b.detach(), requires_grad=False)
    _set_submodule(model, bn_name, nn.Identity())


def fold_bn_(model: nn.Module, flow: Dataflow) -> dict[str, str]:
    """Fold each BatchNorm whose input is the sole output of a Conv/Linear called once; returns {conv: bn}.

    Exact only when the conv's output feeds nothing else and both run once, which the dataflow proves.
    """
    folded: dict[str, str] = {}
    calls: dict[str, int] = {}
    for node in flow.nodes:
        if node.kind == "module":
            calls[node.name] = calls.get(node.name, 0) + 1
    for node in flow.nodes:
        if node.kind != "module" or not isinstance(node.module, _BN) or calls[node.name] != 1:
            continue
        prod = flow.producer_chain(node)
        if prod is None or calls[prod.name] != 1 or not _foldable(prod.module):
            continue
        bn = node.module
        if bn.running_mean is None or bn.running_var is None or not bn.track_running_stats:
            continue
        fuse_pair_(model, prod.name, node.name)
        folded[prod.name] = node.name
    return folded


def prepare(
    model: nn.Module,
    batch: Batch,
    *,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    fold_bn: bool = True,
    device: torch.device | str | None = None,
) -> Prepared:
    """Deepcopy `model` (the user's object is never touched) onto `device`, fold BN, order the target layers."""
    fp = copy.deepcopy(model).eval()
    if device is not None:
        fp = fp.to(device)
        batch = batch_to(batch, device)
    sparse = any(is_spconv_module(m) for m in fp.modules())
    if sparse:
        from sensitivity.integrations.spconv import add_cpu_bias_fallback_

        add_cpu_bias_fallback_(fp)  # spconv's CPU kernels refuse conv + bias in eval mode
    for p in fp.parameters():
        p.requires_grad_(False)
    flow = record_dataflow(fp, batch)
    folded = fold_bn_(fp, flow) if fold_bn else {}
    if folded:
        log.info("folded %d BatchNorm layers into their convs", len(folded))
        if sparse:
            from sensitivity.integrations.spconv import add_cpu_bias_fallback_

            add_cpu_bias_fallback_(fp)  # folding gave biases to sparse convs that had none (idempotent)
        flow = record_dataflow(fp, batch)  # the folded graph: what SmoothQuant folding is decided on
    targets = set(find_targets(fp, only, skip))
    if not targets:
        what = " after --only/--skip" if (only or skip) else ""
        raise NoQuantizableLayersError(f"no Conv / Linear / sparse-conv layer to quantize{what}")
    order = [n for n in flow.module_order() if n in targets]
    never = sorted(targets - set(order))
    if never:
        log.warning(
            "%d target layers never ran on the first batch and are not scanned: %s", len(never), never[:5]
        )
    if not order:
        raise NoQuantizableLayersError(
            "none of the model's Conv / Linear layers ran on the calibration batch"
        )
    layers = []
    for i, name in enumerate(order):
        mod = fp.get_submodule(name)
        layers.append(
            LayerInfo(
                name=name,
                type=type(mod).__name__,
                order=i,
                weight_shape=tuple(mod.weight.shape),
                folded_bn=folded.get(name, ""),
            )
        )
    return Prepared(fp, layers, flow, folded)


def layer_macs(module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample (dim 0 is the batch); sparse convs: an upper bound for the whole
    batch, as if every active output site saw a full kernel (the rule book is not inspected)."""
    w = module.weight
    if is_spconv_module(module):
        return out_shape[0] * w[0].numel() if out_shape else 0
    if isinstance(module, nn.Linear):
        rows = 1
        for d in out_shape[1:-1]:
            rows *= d
        return rows * w.shape[0] * w.shape[1]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        n_in = 1
        for d in in_shape[1:]:
            n_in *= d
        return n_in * w[0].numel()
    n_out = 1
    for d in out_shape[1:]:
        n_out *= d
    return (
        n_out * w[0].numel()
        if isinstance(module, nn.modules.conv._ConvNd)
        else n_out * w.numel() // w.shape[0]
    )
