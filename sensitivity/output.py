"""The public `ScanResult` and writing its report folder.

Everything goes to a temp folder beside the target, then one atomic move (`sensitivity.files.atomic_dir`),
so a failed or interrupted scan never leaves a half-written report that looks complete, and an existing
folder is replaced only with `overwrite=True` when the tool wrote it. The scan itself never writes: the
CLI (or `ScanResult.save`) calls `write_scan`.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import platform
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sensitivity.apply import apply_policy, save_quantized
from sensitivity.files import atomic_dir, torch_save_file
from sensitivity.pipeline import ScanData
from sensitivity.policy import write_exclude, write_policy
from sensitivity.report import render_report

__all__ = ["ScanResult", "scan_json", "stats_arrays", "write_scan"]

log = logging.getLogger(__name__)


class ScanResult(ScanData):
    """Everything a scan measured and decided (`.table`, `.policy`, `.comparison`, `.quant_state`...);
    `save()` writes the report folder."""

    @classmethod
    def of(cls, data: ScanData) -> ScanResult:
        return cls(**{f.name: getattr(data, f.name) for f in fields(ScanData)})

    def save(
        self,
        out_dir: str | os.PathLike[str],
        overwrite: bool = False,
        report: bool = True,
        inputs: Iterable[Any] = (),
    ) -> Path:
        """Write the report folder (atomically); `report=False` skips report.html and the plots. An existing
        folder is replaced only with `overwrite` and only when sensitivity wrote it; `inputs` (paths of the
        model, data...) may not lie in it or hold it."""
        return write_scan(self, out_dir, overwrite=overwrite, report=report, inputs=inputs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return _jsonable(value.item())
    return value


def _version() -> str:
    try:
        return importlib.metadata.version("sensitivity")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


def scan_json(result: ScanData) -> dict[str, Any]:
    opts = result.options
    return _jsonable(
        {
            "format": "sensitivity-scan",
            "version": 1,
            "model": result.model_name,
            "spec": result.spec.to_dict(),
            "options": {
                "only": list(opts.only),
                "skip": list(opts.skip),
                "fold_bn": opts.fold_bn,
                "holdout": opts.holdout,
                "thresholds": vars(opts.thresholds),
                "exclude": list(opts.exclude),
                "outputs": list(opts.outputs),
                "policy": opts.policy,
                "probes": opts.probes,
                "calibrator_choices": opts.calibrator_choices,
                "stored_activation_mb": opts.stored_activation_mb,
                "max_fp_layers": opts.fp_layer_budget(len(result.layers)),
                "max_fp_macs": opts.max_fp_macs,
            },
            "seed": opts.seed,
            "calibration": result.calibration,
            "layers": len(result.layers),
            "excluded": list(result.excluded),
            "folded_bn": result.folded_bn,
            "unscanned": result.unscanned,
            "warnings": result.warnings,
            "first_nonfinite": result.first_nonfinite,
            "policy_first_nonfinite": result.policy_first_nonfinite,
            "comparison": result.comparison.to_dict(orient="records"),
            "output_comparison": result.output_comparison.to_dict(orient="records"),
            "fp_curve": [asdict(p) for p in result.fp_curve],
            "timings": result.timings,
            "versions": {
                "sensitivity": _version(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
    )


def stats_arrays(result: ScanData) -> dict[str, np.ndarray]:
    """Per-layer arrays for re-rendering the report without the model (format: docs in README).

    `layers` (names, execution order); per layer `chan_absmax/<l>` (per-input-channel max |x|),
    `act_hist/<l>` + `act_range/<l>` (held-out input histogram over the fitting range),
    `weight_hist/<l>` + `weight_range/<l>` (histogram of the BN-folded weight), and the SmoothQuant
    sweeps `alpha_sweep/<l>` (channel) / `alpha_sweep_im2col/<l>`: [K, 3] rows (alpha, iso rel L1, SQNR dB)."""
    names = [layer.name for layer in result.layers]
    arrays: dict[str, np.ndarray] = {"layers": np.array(names), **result.sweeps}
    for n in names:
        obs = result.observers.get(n)
        if obs is not None and obs.chan_absmax is not None:
            arrays[f"chan_absmax/{n}"] = obs.chan_absmax.numpy().astype(np.float32)
        hist = result.histograms.get(n)
        if hist is not None:
            arrays[f"act_hist/{n}"] = hist.counts.numpy()
            arrays[f"act_range/{n}"] = np.array([hist.lo, hist.hi], dtype=np.float32)
        if result.fp_model is not None:
            w = result.fp_model.get_submodule(n).weight.detach().float().flatten()
            lo, hi = float(w.min()), float(w.max())
            if not hi > lo:
                lo, hi = lo - 1.0, hi + 1.0
            arrays[f"weight_hist/{n}"] = torch.histc(w, bins=128, min=lo, max=hi).double().numpy()
            arrays[f"weight_range/{n}"] = np.array([lo, hi], dtype=np.float32)
    return arrays


def write_stats(result: ScanData, path: Path) -> None:
    np.savez_compressed(path, **stats_arrays(result))


def write_scan(
    result: ScanData,
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
    report: bool = True,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
) -> Path:
    """Write layers.csv, scan.json, exclude.yaml, policy.yaml, quant_state.pt, stats.npz and the final
    quantized model (model_quant.pt) into `out_dir`; with `report`, report.html and plots/ too. `inputs`
    (the model file, the calibration data...) may not be inside, or hold, the folder."""
    with atomic_dir(out_dir, overwrite, inputs) as tmp:
        result.table.to_csv(tmp / "layers.csv", index=False, float_format="%.6g", lineterminator="\n")
        (tmp / "scan.json").write_text(json.dumps(scan_json(result), indent=2, allow_nan=False) + "\n")
        write_exclude(result.excluded, tmp / "exclude.yaml", spec=result.spec.name)
        write_policy(result.policy, tmp / "policy.yaml")
        torch_save_file(result.quant_state.to_dict(), tmp / "quant_state.pt")
        write_stats(result, tmp / "stats.npz")
        if result.fp_model is not None:
            save_quantized(
                apply_policy(result.fp_model, result.policy, result.quant_state), tmp / "model_quant.pt"
            )
        if report:
            _write_report(tmp, Path(out_dir))
    return Path(out_dir)


def _write_report(folder: Path, final: Path) -> None:
    """report.html + plots/ from the files just written. A render failure must not cost the scan."""
    try:
        render_report(folder)
    except Exception as exc:
        log.warning(
            "report.html not written (%s); the scan is saved: run `sensitivity report %s`", exc, final
        )
