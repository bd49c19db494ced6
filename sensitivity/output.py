"""Write a scan's folder atomically: everything goes to a temp folder beside the target, then a rename.

A failed or interrupted scan therefore never leaves a half-written report that looks complete, and an
existing folder is replaced only with `overwrite=True` (moved aside first, removed after the swap).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sensitivity.errors import OutputDirError
from sensitivity.policy import ExcludeEntry, write_exclude, write_policy

if TYPE_CHECKING:
    from sensitivity.scan import ScanResult

__all__ = ["atomic_dir", "write_scan"]


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


class atomic_dir:
    """`with atomic_dir(path, overwrite) as tmp:` write into tmp; on success tmp becomes path."""

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.path.exists() and not self.overwrite:
            raise OutputDirError(f"output folder {self.path} already exists: pass --overwrite to replace it")
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"output path {self.path} exists and is not a folder")
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-", dir=parent))
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


def write_scan(result: ScanResult, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write layers.csv, scan.json, exclude.yaml, policy.yaml and quant_state.pt into `out_dir`."""
    with atomic_dir(out_dir, overwrite) as tmp:
        result.table.to_csv(tmp / "layers.csv", index=False, float_format="%.6g", lineterminator="\n")
        (tmp / "scan.json").write_text(json.dumps(scan_json(result), indent=2, allow_nan=False) + "\n")
        entries = [ExcludeEntry(layer=n, reason=r, metrics=m) for n, (r, m) in result.excluded.items()]
        write_exclude(entries, tmp / "exclude.yaml", spec=result.spec.name)
        write_policy(result.policy, tmp / "policy.yaml")
        torch.save(result.quant_state, tmp / "quant_state.pt")
    return Path(out_dir)
