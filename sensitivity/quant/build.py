"""Build a quantized copy of a model: target layers swapped for their quantized twins on a deepcopy."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from sensitivity.quant.modules import QuantMixin
from sensitivity.quant.registry import quant_class_for
from sensitivity.spec import QuantSpec

__all__ = [
    "ActQuant",
    "LayerQuant",
    "build_quant_model",
    "configure_layers",
    "quant_layers",
    "same_configs",
]


@dataclass(frozen=True)
class ActQuant:
    """A layer's calibrated activation quantizer settings."""

    amax: torch.Tensor
    unsigned: bool = False


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def build_quant_model(
    fp_model: nn.Module, acts: dict[str, ActQuant], spec: QuantSpec, *, copy_model: bool = True
) -> nn.Module:
    """A copy of `fp_model` (sharing its weight tensors) whose layers named in `acts` fake-quantize input
    (per tensor) and weight. Callers that change weights in place must pass their own copy."""
    if copy_model:
        # a new module tree that shares the FP weight tensors (the quantized layers only read them):
        # one copy of the weights in memory instead of two
        shared = {id(t): t for t in (*fp_model.parameters(), *fp_model.buffers())}
        model = copy.deepcopy(fp_model, memo=shared)
    else:
        model = fp_model
    for name, act in acts.items():
        mod = model.get_submodule(name)
        cls = quant_class_for(mod)
        if cls is None:
            raise TypeError(f"layer {name} ({type(mod).__name__}) has no quantized counterpart")
        qmod = cls.from_float(mod, spec, act_unsigned=act.unsigned)  # type: ignore[attr-defined]
        qmod.input_quantizer.set_amax(act.amax)
        _swap(model, name, qmod)
    return model.eval()


def quant_layers(model: nn.Module) -> dict[str, QuantMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantMixin)}


@dataclass(frozen=True)
class LayerQuant:
    """How one layer runs in a configured quantized model (what a policy decides, with its numbers)."""

    method: str  # "fp" | "naive" | "smoothquant"
    input_amax: torch.Tensor | None = None
    input_unsigned: bool = False
    smooth_scale: torch.Tensor | None = None  # static SmoothQuant factors (per input channel)
    dynamic_alpha: float | None = None  # dynamic SmoothQuant (research): factors per batch


def same_configs(a: dict[str, LayerQuant], b: dict[str, LayerQuant]) -> bool:
    """Do `a` and `b` run every layer the same way? Settings count as equal when they are the same object
    (amax tensors are not compared by value) or both FP; a pass measured for one holds for the other."""
    return a.keys() == b.keys() and all(
        a[n] is b[n] or (a[n].method == "fp" and b[n].method == "fp") for n in a
    )


def configure_layers(model: nn.Module, configs: dict[str, LayerQuant]) -> None:
    """Set each named quantized layer to its method: FP (quantizers off), naive, or SmoothQuant."""
    layers = quant_layers(model)
    for name, cfg in configs.items():
        layer = layers[name]
        enabled = cfg.method != "fp"
        layer.input_quantizer.enabled = enabled
        layer.weight_quantizer.enabled = enabled
        layer.dynamic_alpha = None
        if cfg.method == "smoothquant" and cfg.dynamic_alpha is not None:
            layer.set_smoothing(None)
            layer.dynamic_alpha = cfg.dynamic_alpha
        else:
            layer.set_smoothing(cfg.smooth_scale if cfg.method == "smoothquant" else None)
        if cfg.input_amax is not None:
            layer.input_quantizer.set_amax(cfg.input_amax)
        layer.input_quantizer.unsigned = cfg.input_unsigned
