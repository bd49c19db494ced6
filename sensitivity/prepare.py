"""Prepare the FP reference: a deepcopy in eval mode, BN folded into convs, target layers found in order."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from sensitivity.data import Batch, batch_to
from sensitivity.errors import NoQuantizableLayersError
from sensitivity.graph import Dataflow, eager_modules, record_dataflow
from sensitivity.policy.glob import glob_match
from sensitivity.quant.modules import (
    QUANT_MODULES,
    QuantMixin,
    is_spconv_module,
    is_wrapped_kind,
    quant_class_for,
)
from sensitivity.quant.wrapped import probing

__all__ = [
    "LayerInfo", "Prepared", "find_targets", "fold_bn_", "frozen_copy", "fuse_pair_", "is_target", "prepare",
]  # fmt: skip

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: weight [Cin, Cout/groups, k...]: output channels on axis 1 (folded with groups == 1 only)
_FOLDABLE_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_target(module: nn.Module) -> bool:
    """Conv / ConvTranspose / Linear, their subclasses (quantized where their forward calls the op), or a
    spconv convolution (SubMConv3d, SparseConv3d, SparseInverseConv3d, ...); never our quantized layers."""
    if isinstance(module, QuantMixin):
        return False
    if is_spconv_module(module):
        return quant_class_for(module) is not None
    return any(b in QUANT_MODULES for b in type(module).__mro__)


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
    #: how the layer is quantized when that is not the plain way (a subclass whose forward wraps the op)
    note: str = ""
    #: its forward computes the weight that reaches the op: no BN folding, no SmoothQuant
    weight_transformed: bool = False


@dataclass
class Prepared:
    model: nn.Module
    layers: list[LayerInfo]
    flow: Dataflow
    folded: dict[str, str] = field(default_factory=dict)
    #: conv-like modules that are not scanned -> why (TorchScript, never ran, --only/--skip, ...)
    unscanned: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def find_targets(model: nn.Module, only: list[str] | None = None, skip: list[str] | None = None) -> list[str]:
    """Target layer names (module-tree order), filtered by `only` / `skip` glob lists."""
    names = []
    for name, mod in eager_modules(model):
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
    """Conv1d/2d/3d, Linear, ConvTranspose1d/2d/3d without groups, or a spconv conv (weight
    [Cout, k..., Cin]: output channels first, as here)."""
    if module is None:
        return False
    if isinstance(module, _FOLDABLE):
        return True
    if isinstance(module, _FOLDABLE_TRANSPOSED):
        return module.groups == 1
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
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, gamma, beta,
            transpose=isinstance(conv, _FOLDABLE_TRANSPOSED),
        )  # fmt: skip
    conv.weight = nn.Parameter(w.detach(), requires_grad=False)
    conv.bias = nn.Parameter(b.detach(), requires_grad=False)
    _set_submodule(model, bn_name, nn.Identity())


def fold_bn_(model: nn.Module, flow: Dataflow, skip: set[str] = frozenset()) -> dict[str, str]:  # type: ignore[assignment]
    """Fold each BatchNorm whose input is the sole output of a Conv/Linear called once; returns {conv: bn}.

    Exact only when the conv's output feeds nothing else and both run once, which the dataflow proves;
    `skip` names layers never folded into (subclasses whose forward computes the weight or post-processes
    the op's output)."""
    folded: dict[str, str] = {}
    calls: dict[str, int] = {}
    for node in flow.nodes:
        if node.kind == "module":
            calls[node.name] = calls.get(node.name, 0) + 1
    for node in flow.nodes:
        if node.kind != "module" or not isinstance(node.module, _BN) or calls[node.name] != 1:
            continue
        prod = flow.producer_chain(node)
        if prod is None or prod.name in skip or calls[prod.name] != 1 or not _foldable(prod.module):
            continue
        bn = node.module
        if bn.running_mean is None or bn.running_var is None or not bn.track_running_stats:
            continue
        fuse_pair_(model, prod.name, node.name)
        folded[prod.name] = node.name
    return folded


def _conv_like(module: nn.Module) -> bool:
    """Conv / ConvTranspose / Linear of any kind, supported or not (for the "not scanned" list)."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not isinstance(module, QuantMixin)


def _script_problems(model: nn.Module) -> dict[str, str]:
    """Conv-like modules inside TorchScript submodules: hooks cannot run in scripted code."""
    found: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.jit.ScriptModule) or any(name.startswith(p + ".") for p in found):
            continue
        scripted = [(n, m) for n, m in mod.named_modules() if _SCRIPTED_CONV.match(m.original_name or "")]
        for sub, _ in scripted:
            found[f"{name}.{sub}" if sub else name] = (
                f"inside TorchScript module {name or 'the model'}: hooks cannot run in scripted code "
                "(script only the parts without convs, or pass the eager model)"
            )
    return found


_SCRIPTED_CONV = re.compile(r"^(Conv|ConvTranspose|LazyConv)[123]d$|^Linear$")


def _unscanned(
    fp: nn.Module, candidates: set[str], targets: set[str], ran: set[str], problems: dict[str, str],
    only: list[str] | None, skip: list[str] | None,
) -> dict[str, str]:  # fmt: skip
    """Every conv-like module that is not scanned, with the reason, in module-tree order."""
    out: dict[str, str] = _script_problems(fp)
    for name, mod in fp.named_modules():
        if not name or name in out or not (_conv_like(mod) or name in candidates):
            continue
        if name in problems:
            out[name] = f"{type(mod).__name__}: {problems[name]}"
        elif name not in candidates:
            out[name] = f"{type(mod).__name__} has no quantized form here (not a torch conv / Linear subclass)"
        elif name not in targets:
            out[name] = "matched --skip" if skip and any(glob_match(p, name) for p in skip) else "not in --only"
        elif name not in ran:
            out[name] = "never ran on the first calibration batch"
    return out


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deepcopy in eval mode with every parameter frozen: the user's model is never touched. Parameters
    that are not leaves after the copy (a TorchScript submodule's) are left as they are."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
        fp = copy.deepcopy(model).eval()
    for p in fp.parameters():
        if p.is_leaf:
            p.requires_grad_(False)
    return fp


def prepare(
    model: nn.Module,
    batch: Batch,
    *,
    only: list[str] | None = None,
    skip: list[str] | None = None,
    fold_bn: bool = True,
    device: torch.device | str | None = None,
) -> Prepared:
    """Deepcopy `model` (the user's object is never touched) onto `device`, fold BN, order the target layers.

    Conv subclasses whose forward wraps the op are probed on the first batch: one that calls its op other
    than once per call is not scanned; one that computes its weight in forward gets no BN folding (and, in
    the scan, no SmoothQuant)."""
    fp = frozen_copy(model)
    if device is not None:
        fp = fp.to(device)
        batch = batch_to(batch, device)
    sparse = any(is_spconv_module(m) for m in fp.modules())
    if sparse:
        from sensitivity.integrations.spconv import add_cpu_bias_fallback_

        add_cpu_bias_fallback_(fp)  # spconv's CPU kernels refuse conv + bias in eval mode
    candidates = {n for n, m in eager_modules(fp) if n and is_target(m)}
    wrapped = {n: fp.get_submodule(n) for n in sorted(candidates) if is_wrapped_kind(fp.get_submodule(n))}
    with probing(wrapped) as probes:
        flow = record_dataflow(fp, batch, leaves=candidates)
    found = {n: probe() for n, probe in probes.items()}
    problems = {n: p.problem for n, p in found.items() if p.problem}
    transformed = {n for n, p in found.items() if p.module_calls and not p.weight_is_parameter}
    no_fold = transformed | set(problems) | {n for n, p in found.items() if not p.returns_op_output}
    folded = fold_bn_(fp, flow, skip=no_fold) if fold_bn else {}
    if folded:
        log.info("folded %d BatchNorm layers into their convs", len(folded))
        if sparse:
            from sensitivity.integrations.spconv import add_cpu_bias_fallback_

            add_cpu_bias_fallback_(fp)  # folding gave biases to sparse convs that had none (idempotent)
        flow = record_dataflow(fp, batch, leaves=candidates)  # the folded graph, for SmoothQuant folding
    targets = set(find_targets(fp, only, skip)) - set(problems)
    order = [n for n in flow.module_order() if n in targets]
    unscanned = _unscanned(fp, candidates, targets, set(order), problems, only, skip)
    if unscanned:
        log.warning(
            "%d conv-like layers are not scanned: %s",
            len(unscanned), "; ".join(f"{n} ({why})" for n, why in list(unscanned.items())[:3]),
        )  # fmt: skip
    if not order:
        what = " after --only/--skip" if (only or skip) else ""
        ran = "" if not targets else " (none of them ran on the first calibration batch)"
        raise NoQuantizableLayersError(f"no Conv / Linear / sparse-conv layer to quantize{what}{ran}")
    layers = []
    for i, name in enumerate(order):
        mod = fp.get_submodule(name)
        note = ""
        if name in transformed:
            note = "forward transforms the weight: no BN folding, no SmoothQuant"
        elif name in wrapped:
            note = "forward wraps the op: quantized where the op is called"
        layers.append(
            LayerInfo(
                name=name,
                type=type(mod).__name__,
                order=i,
                weight_shape=tuple(mod.weight.shape),
                folded_bn=folded.get(name, ""),
                note=note,
                weight_transformed=name in transformed,
            )
        )
    return Prepared(fp, layers, flow, folded, unscanned)


def layer_macs(
    module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], output: object = None
) -> int:
    """Multiply-accumulates per sample (dim 0 is the batch). Sparse convs, for the whole batch: rule-book
    pairs x Cin x Cout, exact where spconv kept the rule book in `output` (layers with an `indice_key`),
    else an upper bound, as if every active output site saw a full kernel of active inputs."""
    w = module.weight
    if is_spconv_module(module):
        from sensitivity.integrations.spconv import rule_pairs

        pairs = rule_pairs(module, output)
        if pairs is not None:  # spconv weight [Cout, k..., Cin]
            return pairs * w.shape[0] * w.shape[-1]
        return out_shape[0] * w.numel() if out_shape else 0
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
