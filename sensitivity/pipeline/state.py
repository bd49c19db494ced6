"""Stage 4: the `QuantState`, assembled once from the decisions and the statistics of all calibration
batches (the final amax values and SmoothQuant factors), for `apply` and every other consumer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from sensitivity.capture.calibrate import calibrate
from sensitivity.capture.observe import LayerObserver, channel_dim
from sensitivity.errors import CalibrationDataError
from sensitivity.fold import find_fold_site
from sensitivity.io.batches import Batch, first_sample
from sensitivity.methods.base import Method
from sensitivity.pipeline.options import PhaseProgress
from sensitivity.policy import Policy, Rule
from sensitivity.prepare import prepare
from sensitivity.quant.build import ActQuant, build_quant_model, quant_layers
from sensitivity.quant.modules import QuantMixin, per_channel_amax
from sensitivity.quant.registry import run_context
from sensitivity.quant.state import LayerState, QuantState
from sensitivity.spec import CALIBRATOR_CHOICES, QuantSpec

__all__ = ["calibrate_quant_state", "example_input", "quant_state"]


def example_input(batch: Batch) -> Any:
    """One sample of the first batch (tensor or tuple of tensors), kept for ONNX export without data."""
    small = first_sample(batch)
    if isinstance(small, torch.Tensor):
        return small.detach().cpu().clone()
    if isinstance(small, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in small):
        return tuple(t.detach().cpu().clone() for t in small)
    if isinstance(small, dict):  # e.g. an OpenPCDet batch_dict: its tensors and plain values
        plain = (int, float, str, bool)
        kept = {
            k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
            for k, v in small.items()
            if isinstance(v, (torch.Tensor, *plain))
        }
        return kept or None
    return None


def _layer_state(qmod: QuantMixin, obs: LayerObserver, rule: Rule, fixed: torch.Tensor | None) -> LayerState:
    """The decision for one layer with its final numbers; a SmoothQuant layer calibrates its smoothed
    input with max, exactly from the per-channel maxima (smoothing has already removed what percentile /
    entropy would clip). A checkpoint's own input amax stays the layer's naive amax."""
    method = Method.of(rule)
    own = obs.spec.calibrator_choice
    static_channel = (
        method.kind == "smoothquant" and method.mode != "dynamic" and method.granularity == "channel"
    )
    setting = method.fit(qmod, obs) if static_channel else None
    axis = qmod.weight_quantizer.axis
    assert axis is not None
    return LayerState(
        method=rule.method,
        input_amax=fixed.clone() if fixed is not None else obs.amax().clone(),
        input_unsigned=False if fixed is not None else obs.unsigned(),
        weight_amax=per_channel_amax(qmod.weight, axis),
        channel_absmax=obs.chan_absmax.clone() if obs.chan_absmax is not None else None,
        alpha=rule.alpha,
        granularity=rule.granularity,
        mode=rule.mode,
        smooth_scale=setting.smooth_scale if setting is not None else None,
        smooth_input_amax=setting.input_amax if setting is not None else None,
        calibrator=(rule.calibrator or own) if rule.method == "naive" and fixed is None else own,
        range_amax=_ranges(obs) if fixed is None else None,
        calibrator_default=own,
    )


def _ranges(obs: LayerObserver) -> dict[str, torch.Tensor] | None:
    """Every calibrator choice's amax for this layer, from its histogram (None without one)."""
    if obs.range_hist is None or obs.batches == 0:
        return None
    return {c: obs.calibrator_amax(c).reshape(()).clone() for c in CALIBRATOR_CHOICES}


def quant_state(
    qlayers: Mapping[str, QuantMixin],
    observers: Mapping[str, LayerObserver],
    rules: Mapping[str, Rule],
    spec: QuantSpec,
    *,
    folded: Mapping[str, str],
    sq_fold: Mapping[str, str],
    example: Any,
    fixed: Mapping[str, torch.Tensor] | None = None,
) -> QuantState:
    fixed = fixed or {}
    layers = {n: _layer_state(q, observers[n], rules[n], fixed.get(n)) for n, q in qlayers.items()}
    return QuantState(spec, layers, folded, sq_fold, example)


def calibrate_quant_state(
    model: nn.Module,
    batches: Sequence[Batch],
    policy: Policy,
    spec: QuantSpec,
    *,
    fold_bn: bool = True,
    progress: PhaseProgress | None = None,
) -> QuantState:
    """A quant state from a fresh calibration on all `batches`, for `apply --calib`: amax per layer and,
    for the policy's SmoothQuant layers, their factors."""
    progress = progress or PhaseProgress()
    batches = list(batches)
    if not batches:
        raise CalibrationDataError("the calibration set is empty: give at least one batch")
    with run_context(model):
        prep = prepare(model, batches[0], fold_bn=fold_bn)
        choices = any(r.calibrator for r in policy.rules)
        observers = {
            n: LayerObserver(spec, channel_dim(prep.model.get_submodule(n)), choices=choices)
            for n in prep.names
        }
        with progress.phase("calibrate", len(batches)) as advance:
            calibrate(prep.model, prep.layers, batches, spec, progress=advance, observers=observers)
    acts = {n: ActQuant(observers[n].amax(), observers[n].unsigned()) for n in prep.names}
    qlayers = {n: m for n, m in quant_layers(build_quant_model(prep.model, acts, spec)).items() if n in acts}
    rules = {n: policy.rule_for(n) or Rule(match=n, method="naive") for n in prep.names}
    sq_fold = {n: site.producer for n in prep.names if (site := find_fold_site(prep.flow, n)).producer}
    return quant_state(
        qlayers,
        observers,
        rules,
        spec,
        folded=prep.folded,
        sq_fold=sq_fold,
        example=example_input(batches[0]),
    )
