"""Exclusion by thresholds: which layers to keep in floating point, each with the measured reason.

Reads the LayerTable (one row per layer, index = layer name in execution order) and its columns
`{mode}_{method}_rel_l1`, `{mode}_{method}_sqnr_db` and `{mode}_{method}_nonfinite`. A layer is excluded when
its quantized output has non-finite values, its relative L1 error is above `max_rel_l1`, or its SQNR is below
`min_sqnr_db` (each criterion can be switched off). A NaN metric (0/0: the FP output and the error are both
zero) triggers nothing; non-finite outputs are caught by the non-finite count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from sensitivity.errors import ConfigError
from sensitivity.policy.rules import ExcludeEntry
from sensitivity.spec import METRICS

__all__ = [
    "DEFAULT_MAX_REL_L1",
    "DEFAULT_MIN_SQNR_DB",
    "MODE_NAMES",
    "Thresholds",
    "exclude_by_thresholds",
]

# Defaults measured on real trained CNNs at W8A8 (max calibration, BN folded; 4 models, 28 layers: the demo
# digits CNN, MTCNN RNet and ONet on LFW crops, CREPE-tiny on pure tones), where W8A8 keeps the models'
# behaviour: the worst healthy layer had isolated relative L1 0.081 (median 0.02) and SQNR 20.7 dB (median
# ~35 dB). The limits sit about 2x beyond that (SQNR: error power ~4x the worst healthy layer), so a healthy
# W8A8 layer is not excluded, while a layer with an outlier input channel (relative L1 ~1, SQNR ~0 dB) is.
# At W4A8 / W8A4 most layers of those models cross them, as they should.
DEFAULT_MAX_REL_L1 = 0.15
DEFAULT_MIN_SQNR_DB = 15.0

MODE_NAMES = {"iso": "isolated", "cum": "cumulative"}


@dataclass(frozen=True)
class Thresholds:
    """Exclusion criteria; None (or False for `nonfinite`) switches one off."""

    max_rel_l1: float | None = DEFAULT_MAX_REL_L1  # exclude when relative L1 > this
    min_sqnr_db: float | None = DEFAULT_MIN_SQNR_DB  # exclude when SQNR (dB) < this
    nonfinite: bool = True  # exclude when the quantized output has any NaN / Inf

    def __post_init__(self) -> None:
        for name in ("max_rel_l1", "min_sqnr_db"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"threshold {name} must be a finite number or None, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.max_rel_l1 is not None and self.max_rel_l1 < 0:
            raise ConfigError(f"threshold max_rel_l1 must be >= 0, got {self.max_rel_l1!r}")
        if not isinstance(self.nonfinite, bool):
            raise ConfigError(f"threshold nonfinite must be True or False, got {self.nonfinite!r}")


def _num(value: float, than: float) -> str:
    """`value` with 3 significant digits, more when needed to tell it apart from the threshold `than`."""
    for digits in range(3, 10):
        text = f"{value:.{digits}g}"
        if text != f"{than:g}":
            return text
    return repr(value)


def exclude_by_thresholds(
    table: pd.DataFrame, thresholds: Thresholds | None = None, mode: str = "iso", method: str = "naive"
) -> dict[str, ExcludeEntry]:
    """Layers to keep in FP -> entry with the reason sentence and the metrics behind it, in table order.

    The reason joins every criterion the layer fails with "; ", e.g. "isolated relative L1 0.183 > 0.1;
    isolated SQNR 12.4 dB < 20 dB". The metrics are the layer's rel_l1, sqnr_db and non-finite count for
    `mode` and `method` (full column names), whichever the table has.
    """
    thresholds = thresholds or Thresholds()
    if mode not in MODE_NAMES:
        raise ConfigError(f"error mode must be one of {', '.join(MODE_NAMES)}, got {mode!r}")
    prefix = f"{mode}_{method}_"
    columns = {metric: prefix + metric for metric in ("rel_l1", "sqnr_db", "nonfinite")}
    needed = [
        columns[metric]
        for metric, enabled in (
            ("rel_l1", thresholds.max_rel_l1 is not None),
            ("sqnr_db", thresholds.min_sqnr_db is not None),
            ("nonfinite", thresholds.nonfinite),
        )
        if enabled
    ]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        scanned = sorted(
            {
                str(c)[len(mode) + 1 : -len(metric) - 1]
                for c in table.columns
                for metric in METRICS
                if str(c).startswith(f"{mode}_")
                and str(c).endswith(f"_{metric}")
                and not (metric == "l1" and str(c).endswith("_rel_l1"))
            }
        )
        raise ConfigError(
            f"the layer table has no column {missing[0]!r}; methods scanned in mode {mode}: "
            f"{', '.join(scanned) or 'none'}"
        )
    present = {metric: col for metric, col in columns.items() if col in table.columns}
    words = MODE_NAMES[mode] if method == "naive" else f"{MODE_NAMES[mode]} {method}"
    result: dict[str, ExcludeEntry] = {}
    for layer, row in zip(table.index, table[list(present.values())].itertuples(index=False), strict=True):
        values = {col: float(v) for col, v in zip(present.values(), row, strict=True)}
        reasons: list[str] = []
        nonfinite = values.get(columns["nonfinite"], 0.0)
        if thresholds.nonfinite and nonfinite > 0:
            count = int(nonfinite) if math.isfinite(nonfinite) else nonfinite
            plural = "value" if count == 1 else "values"
            reasons.append(f"{words} output has {count} non-finite {plural}")
        rel_l1 = values.get(columns["rel_l1"], math.nan)
        if thresholds.max_rel_l1 is not None and rel_l1 > thresholds.max_rel_l1:
            limit = thresholds.max_rel_l1
            reasons.append(f"{words} relative L1 {_num(rel_l1, limit)} > {limit:g}")
        sqnr = values.get(columns["sqnr_db"], math.nan)
        if thresholds.min_sqnr_db is not None and sqnr < thresholds.min_sqnr_db:
            limit = thresholds.min_sqnr_db
            reasons.append(f"{words} SQNR {_num(sqnr, limit)} dB < {limit:g} dB")
        if reasons:
            result[str(layer)] = ExcludeEntry(str(layer), "; ".join(reasons), values)
    return result
