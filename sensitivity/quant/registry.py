"""Layer families: which quantized class replaces which float layer, and what else the scan must know about
a kind of layer (its input-channel axis, whether BatchNorm folds into it, its MACs, what it needs around it).

The torch layers (Conv1d/2d/3d, ConvTranspose1d/2d/3d, Linear and their subclasses) are built in. Other
packages' layers join by registering a `Family` (spconv's sparse convs: `sensitivity.integrations.spconv`,
registered when a model has them), so nothing here imports them; a model holding layers of a known
third-party package whose family is not registered is refused with a clear message, never skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from torch import nn

from sensitivity.errors import SensitivityError
from sensitivity.quant.modules import QUANT_MODULES, QuantMixin, subclass_twin

__all__ = [
    "PLUGINS",
    "Family",
    "check_registered",
    "family_of",
    "has_backward_rule",
    "input_channel_axis",
    "is_target",
    "lacks_backward",
    "layer_macs",
    "prepare_model_",
    "quant_class_for",
    "register_family",
    "run_context",
]

#: Third-party packages whose layers a family from `sensitivity.integrations` handles (imported by name
#: only where a model holds such layers: see `sensitivity.integrations.activate`).
PLUGINS = {"spconv": "sensitivity.integrations.spconv"}


@dataclass(frozen=True)
class Family:
    """One kind of quantizable layer.

    `owns` says whether a module belongs to the family (its layers and their helpers); `quant_class`
    gives a layer's quantized twin (None for the family's other modules). `foldable`: a BatchNorm right
    after it folds into its weight. `macs(module, in_shape, out_shape, output)`: multiply-accumulates of
    one call (`output` is what the layer returned: spconv reads its rule book from it). `prepare_model_`
    fixes the scan's FP copy in place; `run_context`
    wraps every pass over a model holding such layers."""

    name: str
    owns: Callable[[nn.Module], bool]
    quant_class: Callable[[nn.Module], type[nn.Module] | None]
    input_channel_axis: Callable[[nn.Module], int]
    foldable: Callable[[nn.Module], bool]
    macs: Callable[[nn.Module, tuple[int, ...], tuple[int, ...], Any], int]
    prepare_model_: Callable[[nn.Module], object] | None = None
    run_context: Callable[[nn.Module], AbstractContextManager[object]] | None = None
    package: str = ""
    #: `backward(first_input)`: whether autograd can go back through the family's modules for this input
    #: (spconv: on CUDA only); None: always. The output probes cut the graph where it cannot.
    backward: Callable[[Any], bool] | None = None


def _is_dense(module: nn.Module) -> bool:
    return not isinstance(module, QuantMixin) and any(b in QUANT_MODULES for b in type(module).__mro__)


def _dense_class(module: nn.Module) -> type[nn.Module] | None:
    if isinstance(module, QuantMixin):
        return None
    return QUANT_MODULES.get(type(module)) or subclass_twin(type(module))


def _dense_macs(
    module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], output: Any = None
) -> int:
    """Per sample (dim 0 is the batch): every output element costs one weight row (Linear: in_features;
    conv: Cin/g·k); a transposed conv scatters every input element over one weight slice."""
    w = module.weight
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
    return n_out * w[0].numel()


def _dense_foldable(module: nn.Module) -> bool:
    """Conv1d/2d/3d, Linear, and ConvTranspose1d/2d/3d without groups (OpenPCDet's BEV deblocks): BN's
    per-channel scale lands on the weight's output-channel axis (axis 1 of a transposed conv's
    [Cin, Cout/groups, k...], so only groups == 1 maps onto whole channels)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
        return True
    return isinstance(module, nn.modules.conv._ConvTransposeNd) and module.groups == 1


DENSE = Family(
    name="dense",
    owns=_is_dense,
    quant_class=_dense_class,
    input_channel_axis=lambda m: -1 if isinstance(m, nn.Linear) else 1,
    foldable=_dense_foldable,
    macs=_dense_macs,
)
_FAMILIES: list[Family] = [DENSE]


def register_family(family: Family) -> None:
    """Add (or replace, by name) a family; idempotent."""
    _FAMILIES[:] = [f for f in _FAMILIES if f.name != family.name] + [family]


def _package(module: nn.Module) -> str:
    return type(module).__module__.split(".", 1)[0]


def family_of(module: nn.Module) -> Family | None:
    for family in reversed(_FAMILIES):  # registered families first: they may own torch subclasses
        if family.owns(module):
            return family
    return None


def quant_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The quantized class for this float layer: its exact twin for the torch types, a generated twin for
    their subclasses, a registered family's twin; None for our own quantized layers and other modules."""
    family = family_of(module)
    return family.quant_class(module) if family is not None else None


def is_target(module: nn.Module) -> bool:
    return quant_class_for(module) is not None


def input_channel_axis(module: nn.Module) -> int:
    """The input-channel axis of the layer's input: 1 for (N, C, ...) convs, -1 for Linear and sparse features."""
    family = family_of(module)
    return family.input_channel_axis(module) if family is not None else 1


def layer_macs(
    module: nn.Module, in_shape: tuple[int, ...], out_shape: tuple[int, ...], output: Any = None
) -> int:
    """Multiply-accumulates of one call of `module` (per sample for dense layers; for the whole batch for
    sparse ones, which have no per-sample dim), by the layer's family."""
    family = family_of(module)
    return family.macs(module, in_shape, out_shape, output) if family is not None else 0


def check_registered(model: nn.Module) -> None:
    """Refuse a model holding layers of a known package (spconv) whose family is not registered."""
    names = {f.package for f in _FAMILIES}
    for module in model.modules():
        package = _package(module)
        if package in PLUGINS and package not in names:
            raise SensitivityError(
                f"the model has {package} layers ({type(module).__name__}) but their support is not loaded: "
                f"call sensitivity.scan / apply_policy / load_quantized (they load it), or import {PLUGINS[package]}"
            )


def lacks_backward(module: nn.Module, first_input: Any) -> bool:
    """True where `module`'s family has no backward for this input (spconv layers on CPU tensors)."""
    family = family_of(module)
    return family is not None and family.backward is not None and not family.backward(first_input)


def has_backward_rule(module: nn.Module) -> bool:
    """True for modules whose family may lack a backward (`lacks_backward` must be asked per input)."""
    family = family_of(module)
    return family is not None and family.backward is not None


def prepare_model_(model: nn.Module) -> None:
    """Every family's fix-up of a scan's FP copy (e.g. spconv's CPU bias fallback); idempotent."""
    for family in _present(model):
        if family.prepare_model_ is not None:
            family.prepare_model_(model)


@contextlib.contextmanager
def run_context(model: nn.Module) -> Iterator[None]:
    """Every family's context for passes over `model` (e.g. one torch thread for spconv on CPU)."""
    with contextlib.ExitStack() as stack:
        for family in _present(model):
            if family.run_context is not None:
                stack.enter_context(family.run_context(model))
        yield


def _present(model: nn.Module) -> list[Family]:
    found = {id(f): f for m in model.modules() if (f := family_of(m)) is not None}
    return list(found.values())
