"""What a scan hands back (`ScanData`; the public `sensitivity.ScanResult` adds `save`), and the summaries
built from its checks: the comparison at the model's outputs, and the warnings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from sensitivity.capture.observe import LayerObserver, RangeHistogram
from sensitivity.capture.passes import PassResult
from sensitivity.io.batches import Batch, batch_len
from sensitivity.metrics import ErrorStats
from sensitivity.pipeline.options import ScanOptions
from sensitivity.policy import ExcludeEntry, Policy
from sensitivity.prepare import LayerInfo
from sensitivity.quant.build import ActQuant, LayerQuant, build_quant_model, configure_layers
from sensitivity.quant.state import QuantState
from sensitivity.spec import QuantSpec

__all__ = [
    "LARGE_OUTPUT_ERROR",
    "MIN_HELDOUT_SAMPLES",
    "ScanData",
    "comparison_tables",
    "output_warning",
    "scan_warnings",
]

#: Fewer held-out samples than this and the decisions rest on too little data to trust.
MIN_HELDOUT_SAMPLES = 32
_OUT_METRICS = ("rel_l1", "sqnr_db", "cosine", "max_abs", "nonfinite")


@dataclass
class ScanData:
    """Everything a scan measured and decided."""

    model_name: str
    options: ScanOptions
    layers: list[LayerInfo]
    table: pd.DataFrame
    #: the layers naive+exclusion keeps in FP, each with the measured reason (what exclude.yaml lists)
    excluded: dict[str, ExcludeEntry]
    policy: Policy
    comparison: pd.DataFrame
    first_nonfinite: str | None
    policy_first_nonfinite: str | None
    quant_state: QuantState
    calibration: dict[str, int]
    timings: dict[str, float]
    observers: dict[str, LayerObserver] = field(repr=False, default_factory=dict)
    histograms: dict[str, RangeHistogram] = field(repr=False, default_factory=dict)
    sweeps: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    folded_bn: dict[str, str] = field(default_factory=dict)
    fp_model: nn.Module | None = field(repr=False, default=None)
    #: conv-like modules that were not scanned -> why (TorchScript, never ran, --only/--skip, ...)
    unscanned: dict[str, str] = field(default_factory=dict)
    #: what makes this scan less trustworthy than it looks (console and report)
    warnings: list[str] = field(default_factory=list)
    #: the comparison per named model output (config, output, out_* metrics): outputs in different units
    #: (box coordinates, class scores) are measured apart
    output_comparison: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: policy v2's curve: output error vs layers kept in FP (`CurvePoint`: predicted, measured where run)
    fp_curve: list[Any] = field(default_factory=list)

    @property
    def spec(self) -> QuantSpec:
        return self.options.spec

    def layer_configs(self, config: str = "policy") -> dict[str, LayerQuant]:
        """Per-layer settings of `config`: "policy", "naive" (every layer quantized) or "exclusion"."""
        return self.quant_state.configs(config, self.excluded)

    def quantized_model(self, config: str = "policy") -> nn.Module:
        """The scanned model quantized with the final amax and factors (refitted on all batches), per
        `config` (see `layer_configs`). Built on the in-memory, BN-folded FP model of this scan, whose weight
        tensors it shares (use `apply_policy` for a standalone, deployable copy)."""
        if self.fp_model is None:
            raise ValueError("this ScanResult holds no model (it was loaded from disk)")
        acts = {n: ActQuant(s.input_amax, s.input_unsigned) for n, s in self.quant_state.layers.items()}
        model = build_quant_model(self.fp_model, acts, self.spec)
        configure_layers(model, self.layer_configs(config))
        return model


def _row(name: str, stats: ErrorStats | None, fp_layers: int, n_layers: int) -> dict[str, Any]:
    row: dict[str, Any] = {"config": name, "quantized_layers": n_layers - fp_layers, "fp_layers": fp_layers}
    m = stats.metrics() if stats is not None else None
    for key in _OUT_METRICS:
        if m is None:
            row[f"out_{key}"] = {"rel_l1": 0.0, "sqnr_db": math.inf, "cosine": 1.0}.get(key, 0.0)
        else:
            row[f"out_{key}"] = m[key]
    return row


def comparison_tables(
    checks: dict[str, PassResult],
    fp_layers: dict[str, int],
    n_layers: int,
    smoothquant_layers: int,
    evals: dict[str, dict[str, float]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """FP / naive / naive+exclusion / policy at the model outputs (with the user's metric), and the same
    per named output."""
    rows = [_row("fp", None, n_layers, n_layers)]
    rows += [_row(c, check.output_stats(), fp_layers[c], n_layers) for c, check in checks.items()]
    comparison = pd.DataFrame(rows)
    comparison.insert(
        3, "out_rel_mse", [0.0, *(check.out_rel_mse() for check in checks.values())]
    )  # the policy's objective: Σ over outputs of ‖Δy‖² / ‖y‖²
    comparison["smoothquant_layers"] = [0, 0, 0, smoothquant_layers]
    for key in sorted({k for v in evals.values() for k in v}):
        comparison[f"eval_{key}"] = [evals.get(c, {}).get(key, math.nan) for c in comparison["config"]]
    per_output = pd.DataFrame(
        [
            {"config": config, "output": key, **_row(config, stats, 0, 0)}
            for config, check in checks.items()
            for key, stats in check.out.items()
        ],
        columns=["config", "output", *(f"out_{k}" for k in _OUT_METRICS)],
    )
    return comparison, per_output


#: A verified policy leaving more relative output MSE than this (output SNR under 20 dB) is worth a warning.
LARGE_OUTPUT_ERROR = 0.01


def output_warning(measured: float, fp_layers: int, budget: int) -> str | None:
    """What to say when the verified policy still leaves a large output error, or None."""
    if not measured > LARGE_OUTPUT_ERROR:
        return None
    snr = -10.0 * math.log10(measured) if measured > 0 and math.isfinite(measured) else -math.inf
    return (
        f"the verified policy still leaves a relative output MSE of {measured:.3g} (output SNR {snr:.1f} dB) "
        f"with {fp_layers} layers in FP (budget {budget}): raise --max-fp-layers, calibrate on more data, "
        "or give --eval with --exclude-budget to spend FP layers until your metric is met"
    )


def scan_warnings(unscanned: dict[str, str], held: list[Batch], batches: list[Batch]) -> list[str]:
    """What makes this scan less trustworthy than it looks: layers left out, too little held-out data."""
    out = []
    if unscanned:
        first = "; ".join(f"{n} ({why})" for n, why in list(unscanned.items())[:3])
        more = f" and {len(unscanned) - 3} more" if len(unscanned) > 3 else ""
        out.append(f"{len(unscanned)} conv-like layers were not scanned: {first}{more}")
    samples = sum(batch_len(b) or 1 for b in held)
    if len(batches) == 1:
        out.append(
            "only one calibration batch: it is both fitted and scored, so the decisions are not checked on "
            "held-out data (give more batches)"
        )
    elif samples < MIN_HELDOUT_SAMPLES:
        out.append(
            f"the decisions rest on {samples} held-out samples ({len(held)} batch{'es' if len(held) > 1 else ''}):"
            f" give more calibration data (at least {MIN_HELDOUT_SAMPLES} held-out samples) to trust them"
        )
    return out
