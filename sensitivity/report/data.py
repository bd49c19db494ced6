"""Load a report folder (layers.csv + scan.json + stats.npz + the YAMLs) into one `ReportData`.

The report reads only these files, never the model or torch, so any scan folder re-renders anywhere.
Column meaning is discovered from names (`{iso,cum}_{method}_{metric}`), so new methods such as
SmoothQuant's `sq` appear in the report without changes here.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sensitivity.errors import SensitivityError
from sensitivity.spec import METRICS

__all__ = [
    "METRICS",
    "MODES",
    "SIGN_VARIANTS",
    "MetricColumn",
    "ReportData",
    "ReportDataError",
    "load_report_data",
    "metric_columns",
]

MODES = ("iso", "cum")
#: Isolated "methods" that are the same naive layer with the other activation sign (unsigned_gain_db).
SIGN_VARIANTS = ("unsigned", "signed")

_METRIC_RE = re.compile(r"^(iso|cum)_([A-Za-z0-9]+(?:_[A-Za-z0-9]+)*?)_(" + "|".join(METRICS) + r")$")


class ReportDataError(SensitivityError):
    """A report folder whose files are missing or corrupt (so the report cannot be rendered)."""


@dataclass(frozen=True)
class MetricColumn:
    """One `{mode}_{method}_{metric}` column of layers.csv, parsed."""

    column: str
    mode: str
    method: str
    metric: str


def metric_columns(columns: list[str]) -> list[MetricColumn]:
    """Parse every metric column, in the table's column order."""
    found = []
    for col in columns:
        m = _METRIC_RE.match(col)
        if m:
            found.append(MetricColumn(col, m.group(1), m.group(2), m.group(3)))
    return found


@dataclass
class ReportData:
    """Everything the report shows, as read from one folder."""

    folder: Path
    table: pd.DataFrame
    scan: dict[str, Any]
    stats: dict[str, np.ndarray]
    exclude_yaml: str | None = None
    policy_yaml: str | None = None
    metrics: list[MetricColumn] = field(default_factory=list)

    @property
    def folded(self) -> set[str]:
        """Layers a BatchNorm was folded into (their stored weight histogram is of the folded weight)."""
        return {str(k) for k in (self.scan.get("folded_bn") or {})}

    # ------------------------------------------------------------------------------------ column helpers
    def methods(self, mode: str, metric: str = "rel_l1", sign_variants: bool = False) -> list[str]:
        """Methods with a `{mode}_{method}_{metric}` column, in column order."""
        seen: list[str] = []
        for mc in self.metrics:
            wanted = sign_variants or mc.method not in SIGN_VARIANTS
            if mc.mode == mode and mc.metric == metric and mc.method not in seen and wanted:
                seen.append(mc.method)
        return seen

    def column(self, mode: str, method: str, metric: str) -> pd.Series | None:
        return self.table.get(f"{mode}_{method}_{metric}")

    @property
    def names(self) -> list[str]:
        return [str(n) for n in self.table["name"]]

    @property
    def excluded(self) -> list[str]:
        """Layers on the exclusion list (scan.json `excluded`, i.e. exclude.yaml) or kept in FP by the
        policy, in execution order. A listed layer the policy rescues (e.g. with SmoothQuant) stays marked."""
        listed = {str(n) for n in self.scan.get("excluded") or []}
        if "decision" in self.table:
            listed |= {
                str(n) for n, d in zip(self.table["name"], self.table["decision"], strict=True) if d == "fp"
            }
        return [n for n in self.names if n in listed]

    def nonfinite_layers(self) -> list[str]:
        """Layers with NaN/Inf in any metric column's non-finite count (isolated or cumulative)."""
        cols = [mc.column for mc in self.metrics if mc.metric == "nonfinite"]
        if not cols:
            return []
        bad = self.table[cols].fillna(0).gt(0).any(axis=1)
        return [str(n) for n in self.table.loc[bad, "name"]]

    def worst(self, k: int, metric: str = "rel_l1") -> list[str]:
        """The k layers with the largest isolated naive error (non-finite first), for the detail plots."""
        col = self.column("iso", "naive", metric)
        if col is None:
            return self.names[:k]
        score = pd.to_numeric(col, errors="coerce").replace([np.inf], np.finfo(float).max).fillna(-1.0)
        nf = self.column("iso", "naive", "nonfinite")
        if nf is not None:
            score = score.where(nf.fillna(0) <= 0, np.inf)
        order = score.sort_values(ascending=False, kind="stable").index[:k]
        return [str(self.table.loc[i, "name"]) for i in order]

    def array(self, kind: str, layer: str) -> np.ndarray | None:
        return self.stats.get(f"{kind}/{layer}")

    def threshold(self, key: str) -> float | None:
        value = (self.scan.get("options") or {}).get("thresholds", {}).get(key)
        return _number(value)


def _number(value: Any) -> float | None:
    """scan.json numbers: floats, None for NaN, and the strings 'inf' / '-inf'."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ReportDataError(f"{path} is missing: is this a sensitivity report folder?")
    try:
        table = pd.read_csv(path, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise ReportDataError(f"{path} is not a readable layers table: {str(exc).splitlines()[0]}") from exc
    if "name" not in table.columns:
        raise ReportDataError(f"{path} has no 'name' column: not a sensitivity layers table")
    if "order" in table.columns:
        table = table.sort_values("order", kind="stable")
    table = table.reset_index(drop=True)
    table["name"] = table["name"].astype(str)
    for mc in metric_columns(list(table.columns)):
        table[mc.column] = pd.to_numeric(table[mc.column], errors="coerce")
    if "reason" in table.columns:
        # an all-empty reason column reads back as float NaN: cast first, then blank the NaNs
        table["reason"] = table["reason"].astype(object).where(table["reason"].notna(), "").astype(str)
    return table


def _read_scan(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ReportDataError(f"{path} is missing: is this a sensitivity report folder?")
    try:
        scan = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ReportDataError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(scan, dict) or scan.get("format") != "sensitivity-scan":
        raise ReportDataError(f'{path} is not a sensitivity scan.json (no "format": "sensitivity-scan")')
    for key, kind in _SCAN_TYPES.items():
        value = scan.get(key)
        if value is not None and not isinstance(value, kind):
            raise ReportDataError(f"{path}: {key!r} must be {_KIND_NAMES[kind]}, not {type(value).__name__}")
    for key, kind in _SPEC_TYPES.items():
        value = (scan.get("spec") or {}).get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ReportDataError(
                f"{path}: 'spec.{key}' must be {_KIND_NAMES[kind]}, not {type(value).__name__}"
            )
    if not all(isinstance(row, dict) for row in scan.get("comparison") or []):
        raise ReportDataError(f"{path}: 'comparison' must be a list of mappings")
    return scan


#: The types scan.json's fields must have for the report to read them (a hand-edited file may not).
_SCAN_TYPES: dict[str, type | tuple[type, ...]] = {
    "model": str, "spec": dict, "options": dict, "calibration": dict, "timings": dict, "comparison": list,
    "output_comparison": list,
    "folded_bn": dict, "unscanned": dict, "warnings": list, "excluded": list, "versions": dict,
    "first_nonfinite": str, "policy_first_nonfinite": str,
}  # fmt: skip
_SPEC_TYPES: dict[str, type | tuple[type, ...]] = {
    "spec": str, "calibrator": str, "act_sign": str, "w_bits": int, "a_bits": int, "percentile": (int, float),
}  # fmt: skip
_KIND_NAMES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    int: "an integer",
    (int, float): "a number",
}


def _read_stats(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ReportDataError(f"{path} is missing: is this a sensitivity report folder?")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ReportDataError(f"{path} is not a readable stats archive: {exc}") from exc


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8") if path.is_file() else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportDataError(f"{path} cannot be read: {exc}") from exc


def load_report_data(folder: str | Path) -> ReportData:
    """Read a scan's folder. Raises ReportDataError (one line) when a required file is missing/corrupt."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportDataError(f"report folder {folder} does not exist")
    table = _read_table(folder / "layers.csv")
    scan = _read_scan(folder / "scan.json")
    stats = _read_stats(folder / "stats.npz")
    return ReportData(
        folder=folder,
        table=table,
        scan=scan,
        stats=stats,
        exclude_yaml=_read_text(folder / "exclude.yaml"),
        policy_yaml=_read_text(folder / "policy.yaml"),
        metrics=metric_columns(list(table.columns)),
    )
