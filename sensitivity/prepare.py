"""Prepare the FP reference: a deepcopy in eval mode, BN folded into convs, target layers found in order."""

from __future__ import annotations

import copy
import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from sensitivity.errors import NoQuantizableLayersError
from sensitivity.graph import Dataflow, eager_modules, record_dataflow, without_folded
from sensitivity.io.batches import Batch, batch_to
from sensitivity.quant.modules import QuantMixin, is_wrapped_kind
from sensitivity.quant.registry import check_registered, family_of, is_target, prepare_model_
from sensitivity.quant.wrapped import probing

__all__ = [
    "LayerInfo",
    "Prepared",
    "Selection",
    "find_targets",
    "fold_bn_",
    "frozen_copy",
    "fuse_pair_",
    "prepare",
]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


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
    #: FP seconds of one call of one sample, timed in the calibration pass (0: not timed, e.g. resumed)
    seconds: float = 0.0
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


#: Why a layer is left out by the user's selection (e.g. "matched --skip"), or None when it is scanned.
Selection = Callable[[str], "str | None"]


def _everything(name: str) -> str | None:
    return None


def find_targets(model: nn.Module, select: Selection = _everything) -> list[str]:
    """Target layer names (module-tree order) that `select` keeps."""
    return [name for name, mod in eager_modules(model) if name and is_target(mod) and select(name) is None]


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _foldable(module: nn.Module | None) -> bool:
    """A layer whose family folds BN into it (Conv1d/2d/3d, Linear, a spconv conv: output channels first)."""
    family = family_of(module) if module is not None else None
    return family is not None and family.foldable(module)  # type: ignore[arg-type]


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
            transpose=isinstance(conv, nn.modules.conv._ConvTransposeNd),
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
    fp: nn.Module, candidates: set[str], ran: set[str], problems: dict[str, str], select: Selection
) -> dict[str, str]:
    """Every conv-like module that is not scanned, with the reason, in module-tree order."""
    out: dict[str, str] = _script_problems(fp)
    for name, mod in fp.named_modules():
        if not name or name in out or not (_conv_like(mod) or name in candidates):
            continue
        if name in problems:
            out[name] = f"{type(mod).__name__}: {problems[name]}"
        elif name not in candidates:
            out[name] = (
                f"{type(mod).__name__} has no quantized form here (not a torch conv / Linear subclass)"
            )
        elif select(name) is not None:
            out[name] = str(select(name))
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
    select: Selection = _everything,
    fold_bn: bool = True,
    device: torch.device | str | None = None,
) -> Prepared:
    """Deepcopy `model` (the user's object is never touched) onto `device`, fold BN, order the target layers.

    Conv subclasses whose forward wraps the op are probed on the first batch: one that calls its op other
    than once per call is not scanned; one that computes its weight in forward gets no BN folding (and, in
    the scan, no SmoothQuant)."""
    check_registered(model)
    fp = frozen_copy(model)
    if device is not None:
        fp = fp.to(device)
        batch = batch_to(batch, device)
    prepare_model_(fp)  # e.g. spconv's CPU kernels refuse conv + bias in eval mode
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
        prepare_model_(fp)  # folding gave biases to layers that had none (idempotent)
        flow = without_folded(flow, fp, folded.values())  # the folded graph, for SmoothQuant folding
    targets = set(find_targets(fp, select)) - set(problems)
    order = [n for n in flow.module_order() if n in targets]
    unscanned = _unscanned(fp, candidates, set(order), problems, select)
    if unscanned:
        log.warning(
            "%d conv-like layers are not scanned: %s",
            len(unscanned), "; ".join(f"{n} ({why})" for n, why in list(unscanned.items())[:3]),
        )  # fmt: skip
    if not order:
        what = " after --only/--skip" if any(select(n) for n in candidates) else ""
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
