"""Write a scan's folder atomically: everything goes to a temp folder beside the target, then a rename.

A failed or interrupted scan therefore never leaves a half-written report that looks complete, and an
existing folder is replaced only with `overwrite=True` (moved aside first, removed after the swap).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sensitivity.errors import OutputDirError
from sensitivity.files import default_mode
from sensitivity.policy import ExcludeEntry, write_exclude, write_policy

if TYPE_CHECKING:
    from sensitivity.scan import ScanResult

__all__ = ["atomic_dir", "check_output_dir", "write_scan"]

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


def check_output_dir(path: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Refuse, in one line, an output folder that cannot be written, before any work is done: one that
    exists (without `overwrite`) or is a file, one below a file, or one whose nearest existing folder is
    not writable."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputDirError(f"output folder {path} already exists: pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output path {path} exists and is not a folder")
    for folder in path.parents:  # the nearest one that exists is where the folder will be made
        if folder.exists():
            if not folder.is_dir():
                raise OutputDirError(f"cannot write to {path}: {folder} is a file, not a folder")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputDirError(f"cannot write to {path}: {folder} is not writable (permission denied)")
            return


def _torch_save(obj: Any, path: Path) -> None:
    """`torch.save` through a Python file, so a full disk raises OSError (ENOSPC / EFBIG) rather than
    the C++ writer's RuntimeError, and becomes an OutputDirError in `atomic_dir`."""
    with open(path, "wb") as f:
        torch.save(obj, f)


class atomic_dir:
    """`with atomic_dir(path, overwrite) as tmp:` write into tmp; on success tmp becomes path."""

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        check_output_dir(self.path, self.overwrite)
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=parent))
            os.chmod(self.tmp, default_mode(directory=True))  # mkdtemp's 0700 would make the report private
        except OSError as exc:
            raise OutputDirError(f"cannot write to {parent}: {exc.strerror or exc}") from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and not isinstance(exc, OutputDirError):
                raise OutputDirError(f"writing {self.path} failed: {exc.strerror or exc}") from exc
            return
        old = None
        try:
            if self.path.exists():
                old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
                os.replace(self.path, old)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if old is not None and not self.path.exists():
                os.replace(old, self.path)
            raise OutputDirError(f"cannot move the report into {self.path}: {exc.strerror or exc}") from exc
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
            "first_nonfinite": result.first_nonfinite,
            "policy_first_nonfinite": result.policy_first_nonfinite,
            "comparison": result.comparison.to_dict(orient="records"),
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
    result: ScanResult, out_dir: str | os.PathLike[str], overwrite: bool = False, report: bool = True
) -> Path:
    """Write layers.csv, scan.json, exclude.yaml, policy.yaml, quant_state.pt, stats.npz and the final
    quantized model (model_quant.pt) into `out_dir`; with `report`, report.html and plots/ too."""
    with atomic_dir(out_dir, overwrite) as tmp:
        result.table.to_csv(tmp / "layers.csv", index=False, float_format="%.6g", lineterminator="\n")
        (tmp / "scan.json").write_text(json.dumps(scan_json(result), indent=2, allow_nan=False) + "\n")
        entries = [ExcludeEntry(layer=n, reason=r, metrics=m) for n, (r, m) in result.excluded.items()]
        write_exclude(entries, tmp / "exclude.yaml", spec=result.spec.name)
        write_policy(result.policy, tmp / "policy.yaml")
        _torch_save(result.quant_state, tmp / "quant_state.pt")
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
