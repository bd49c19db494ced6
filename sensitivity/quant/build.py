"""Build a quantized copy of a model: target layers swapped for their quantized twins on a deepcopy."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from sensitivity.quant.modules import QuantMixin, quant_class_for
from sensitivity.quant.spec import QuantSpec

__all__ = ["ActQuant", "build_quant_model", "quant_layers", "set_layer_enabled"]


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
    """A deepcopy of `fp_model` whose layers named in `acts` fake-quantize input (per tensor) and weight."""
    model = copy.deepcopy(fp_model) if copy_model else fp_model
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


def set_layer_enabled(model: nn.Module, names: Iterable[str], enabled: bool) -> None:
    """Turn quantization of the named layers on or off (off = the layer computes in FP)."""
    layers = quant_layers(model)
    for name in names:
        layer = layers[name]
        layer.input_quantizer.enabled = enabled
        layer.weight_quantizer.enabled = enabled
