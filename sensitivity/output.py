"""Write a scan's report folder: everything goes to a temp folder beside the target, then one atomic
move (`sensitivity.files.atomic_dir`), so a failed or interrupted scan never leaves a half-written report
that looks complete, and an existing folder is replaced only with `overwrite=True` when the tool wrote it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sensitivity.files import atomic_dir, torch_save_file
from sensitivity.policy import ExcludeEntry, write_exclude, write_policy

if TYPE_CHECKING:
    from sensitivity.scan import ScanResult

__all__ = ["scan_json", "stats_arrays", "write_scan"]

log = logging.getLogger(__name__)


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


def scan_json(result: ScanResult) -> dict[str, Any]:
    import sensitivity

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
            "timings": result.timings,
            "versions": {
                "sensitivity": getattr(sensitivity, "__version__", "0"),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
    )


def stats_arrays(result: ScanResult) -> dict[str, np.ndarray]:
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


def write_stats(result: ScanResult, path: Path) -> None:
    np.savez_compressed(path, **stats_arrays(result))


def write_scan(
    result: ScanResult,
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
        entries = [ExcludeEntry(layer=n, reason=r, metrics=m) for n, (r, m) in result.excluded.items()]
        write_exclude(entries, tmp / "exclude.yaml", spec=result.spec.name)
        write_policy(result.policy, tmp / "policy.yaml")
        torch_save_file(result.quant_state, tmp / "quant_state.pt")
        write_stats(result, tmp / "stats.npz")
        if result.fp_model is not None:
            from sensitivity.apply import apply_policy, save_quantized

            save_quantized(
                apply_policy(result.fp_model, result.policy, result.quant_state), tmp / "model_quant.pt"
            )
        if report:
            _write_report(tmp, Path(out_dir))
    return Path(out_dir)


def _write_report(folder: Path, final: Path) -> None:
    """report.html + plots/ from the files just written. A render failure must not cost the scan."""
    from sensitivity.report import render_report

    try:
        render_report(folder)
    except Exception as exc:
        log.warning(
            "report.html not written (%s); the scan is saved: run `sensitivity report %s`", exc, final
        )
