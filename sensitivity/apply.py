"""The final quantized model: apply a policy with the scan's calibrated state, save it, reload it.

`apply_policy` works on a deepcopy of the user's FP model (never mutated): BN folded as the scan folded it,
excluded layers in FP, naive layers quantized with the refitted amax, SmoothQuant layers with their
factors in the weights and the input division folded into the producer where the scan proved that exact
(else one per-channel multiply before the input quantizer). `save_quantized` writes state dict + spec +
policy + layer settings (no pickled modules); `load_quantized` rebuilds the same model from a factory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensitivity.errors import ConfigError, ModelLoadError
from sensitivity.files import atomic_torch_save
from sensitivity.methods.base import Method
from sensitivity.policy import Policy, dump_policy, parse_policy
from sensitivity.prepare import frozen_copy, fuse_pair_
from sensitivity.quant.build import ActQuant, LayerQuant, build_quant_model, configure_layers, quant_layers
from sensitivity.quant.modules import QuantMixin
from sensitivity.quant.registry import prepare_model_
from sensitivity.quant.smoothing import Smoother
from sensitivity.quant.state import QuantState
from sensitivity.spec import QuantSpec

__all__ = [
    "FORMAT",
    "apply_policy",
    "fold_smoothing_",
    "load_quant_state",
    "load_quantized",
    "save_quantized",
]

FORMAT = "sensitivity-quantized"


def load_quant_state(path: str | os.PathLike[str]) -> QuantState:
    """Read and check a quant_state.pt (weights-only: tensors and plain data)."""
    if not Path(path).is_file():
        raise ModelLoadError(f"no quant state at {path}: pass --quant-state or --calib to recalibrate")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable quant state: {str(exc).splitlines()[0]}") from exc
    return QuantState.from_dict(data, str(path))


def _configs(qlayers: dict[str, QuantMixin], policy: Policy, state: QuantState) -> dict[str, LayerQuant]:
    """Each layer's setting: as the scan decided it where the policy asks for the decided method (nothing
    recomputed), else fitted for the policy's method from the statistics the state keeps (a user edit)."""
    configs: dict[str, LayerQuant] = {}
    for name, layer in state.layers.items():
        method = Method.of(policy.rule_for(name))
        if method.granularity == "im2col":
            raise ConfigError(
                f"layer {name}: im2col SmoothQuant is research-only (no deployable form); use granularity channel"
            )
        fitted = method.kind != "smoothquant" or method.mode == "dynamic" or layer.smooth_scale is not None
        if method == Method.of(layer) and fitted:
            configs[name] = layer.setting()
            continue
        try:
            configs[name] = method.fit(qlayers[name], layer)
        except ConfigError as exc:
            raise ConfigError(f"layer {name}: {exc}") from exc
    return configs


def fold_smoothing_(model: nn.Module, consumer: str, producer: str) -> None:
    """Move `consumer`'s 1/s into `producer`'s output channels (conv / Linear rows, BN affine), in place."""
    layer = model.get_submodule(consumer)
    assert isinstance(layer, QuantMixin) and layer.smoother is not None
    inv = 1.0 / layer.smoother.scale
    prod = model.get_submodule(producer)
    with torch.no_grad():
        if isinstance(prod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            if prod.weight is None or prod.bias is None:
                raise ConfigError(f"cannot fold into {producer}: BatchNorm without affine parameters")
            prod.weight.mul_(inv)
            prod.bias.mul_(inv)
        else:
            w = prod.weight
            rows = inv.to(w.device).reshape(-1, *([1] * (w.dim() - 1)))
            if isinstance(prod, QuantMixin) and prod.weight_quantizer.enabled:
                # Snap the weight to its quantization grid first (what is deployed anyway), then scale
                # codes' step and amax together: the codes stay exactly the same. Dividing the raw weight
                # and re-deriving amax would flip codes that sit on an exact .5 tie (seen on real models).
                w.copy_(prod.quantized_weight() * rows)
                prod.weight_quantizer.set_amax(prod.weight_quantizer.amax * inv.to(w.device))
                prod._wq_cache = None
            else:
                w.mul_(rows)
            if prod.bias is not None:
                prod.bias.mul_(inv.to(prod.bias.device))
    layer.smoother.folded = True


def apply_policy(
    model: nn.Module, policy: Policy, quant_state: QuantState | dict[str, Any], *, fold_smoothing: bool = True
) -> nn.Module:
    """The final quantized model (a new module; `model` is untouched). `quant_state` is a scan's
    `QuantState` (or the dict of its `quant_state.pt`); `model` the same FP architecture and weights the
    scan saw."""
    state = QuantState.from_dict(quant_state)
    spec = state.spec
    if policy.spec != spec.name:
        raise ConfigError(
            f"the policy is for {policy.spec} but the quant state was calibrated for {spec.name}: rescan with "
            f"--spec {policy.spec}, or apply with --calib to recalibrate for it"
        )
    fp = frozen_copy(model)
    try:
        for conv, bn in state.folded_bn.items():
            fuse_pair_(fp, conv, bn)
        if state.folded_bn:
            prepare_model_(fp)  # as the scan's prepare: folding gave biases to layers that had none
        acts = {n: ActQuant(s.input_amax, s.input_unsigned) for n, s in state.layers.items()}
        qmodel = build_quant_model(fp, acts, spec, copy_model=False)
    except (AttributeError, AssertionError, TypeError) as exc:
        raise ModelLoadError(f"the model does not match the scan's quant state: {exc}") from exc
    qlayers = {n: m for n, m in quant_layers(qmodel).items() if n in acts}
    configs = _configs(qlayers, policy, state)
    configure_layers(qmodel, configs)
    for layer in qlayers.values():
        layer.bake_smoothing_()  # W * s becomes the stored weight, as deployed
    if fold_smoothing:
        for consumer, producer in state.sq_fold.items():
            cfg = configs.get(consumer)
            if cfg is not None and cfg.method == "smoothquant" and cfg.smooth_scale is not None:
                fold_smoothing_(qmodel, consumer, producer)
    qmodel.sensitivity_meta = {  # type: ignore[assignment]
        "spec": spec.to_dict(),
        "policy": dump_policy(policy),
        "folded_bn": dict(state.folded_bn),
    }
    return qmodel


def _layer_meta(qmodel: nn.Module) -> dict[str, dict[str, Any]]:
    meta = {}
    for name, layer in quant_layers(qmodel).items():
        enabled = layer.input_quantizer.enabled
        meta[name] = {
            "quantized": enabled,
            "input_unsigned": layer.input_quantizer.unsigned,
            "smoothing": layer.smoother is not None,
            "smooth_folded": bool(layer.smoother is not None and layer.smoother.folded),
            "smooth_weight_baked": bool(layer.smoother is not None and layer.smoother.weight_baked),
            "smooth_channels": int(layer.smoother.scale.numel()) if layer.smoother is not None else 0,
            "dynamic_alpha": layer.dynamic_alpha,
        }
    return meta


def save_quantized(qmodel: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write `model_quant.pt`: tensors and plain data only (loads with weights_only=True)."""
    meta = getattr(qmodel, "sensitivity_meta", None)
    if meta is None:
        raise ValueError("save_quantized expects a model made by apply_policy")
    payload = {
        "format": FORMAT,
        "version": 1,
        **meta,
        "layers": _layer_meta(qmodel),
        "state_dict": {k: v.detach().cpu() for k, v in qmodel.state_dict().items()},
    }
    return atomic_torch_save(payload, path)


def load_quantized(path: str | os.PathLike[str], model_factory: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild a saved quantized model: `model_factory()` gives the FP architecture (weights unused)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise ModelLoadError(f"quantized model {path} not found") from exc
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a readable quantized model: {str(exc).splitlines()[0]}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelLoadError(f"{path} is not a sensitivity quantized model (model_quant.pt)")
    spec = QuantSpec.from_dict(payload["spec"])
    model = model_factory().eval()
    for conv, bn in payload["folded_bn"].items():  # structure only: the weights come from the state dict
        c = model.get_submodule(conv)
        if c.bias is None:
            c.bias = nn.Parameter(torch.zeros(c.weight.shape[0]), requires_grad=False)
        parent, _, attr = bn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    layers = payload["layers"]
    acts = {n: ActQuant(torch.tensor(1.0), bool(m["input_unsigned"])) for n, m in layers.items()}
    qmodel = build_quant_model(model, acts, spec, copy_model=False)
    for name, m in quant_layers(qmodel).items():
        lm = layers[name]
        m.input_quantizer.enabled = m.weight_quantizer.enabled = bool(lm["quantized"])
        if lm["smoothing"]:
            m.smoother = Smoother(
                torch.ones(lm["smooth_channels"]), m.input_channel_axis, lm["smooth_folded"]
            )
            m.smoother.weight_baked = bool(lm.get("smooth_weight_baked", False))
        m.dynamic_alpha = lm["dynamic_alpha"]
    missing, unexpected = qmodel.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path} does not fit the factory's model: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    for m in quant_layers(qmodel).values():
        m._wq_cache = None
    policy = parse_policy(payload["policy"], source=str(path))
    qmodel.sensitivity_meta = {
        "spec": payload["spec"],
        "policy": dump_policy(policy),
        "folded_bn": payload["folded_bn"],
    }  # type: ignore[assignment]
    return qmodel
