"""Per-layer assignment: keep in FP, quantize naively, or quantize with SmoothQuant (alpha, granularity).

Reads the LayerTable's isolated errors, measured on held-out batches (so static factors that only fit the
calibration data lose): `iso_naive_*` and, when SmoothQuant was scanned, `iso_sq_*` (the best alpha /
granularity per layer, named in `sq_alpha`, `sq_granularity`, `sq_mode`). SmoothQuant is chosen when it
passes the thresholds and either naive fails them or SmoothQuant cuts the isolated relative L1 to at
most `margin` times naive's. A layer neither method brings within the thresholds stays in FP, with both
measurements in its reason.

The default margin, 0.5 (SmoothQuant must halve the error), comes from four real trained CNNs at W8A8
(digits CNN, MTCNN RNet / ONet, CREPE-tiny): SmoothQuant at its best alpha cut the isolated error of
ordinary layers by 0-40% (and raised it on some CREPE layers, caught by the held-out scoring), but by
3-6x on the classification heads with outlier channels (ONet dense6_2: 0.17x, RNet dense5_2: 0.30x).
Halving separates the two, so a layer that is already fine keeps the simpler naive quantization.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

from sensitivity.policy.exclude import Thresholds, exclude_by_thresholds
from sensitivity.policy.rules import Rule

__all__ = ["DEFAULT_SQ_MARGIN", "assign_methods"]

#: SmoothQuant must cut the isolated relative L1 to this fraction of naive's to be preferred.
DEFAULT_SQ_MARGIN = 0.5


@dataclass(frozen=True)
class _Sq:
    alpha: float
    granularity: str
    mode: str
    rel_l1: float


def _metrics(row: pd.Series, prefix: str) -> dict[str, float]:
    return {
        f"{prefix}{m}": float(row[f"{prefix}{m}"])
        for m in ("rel_l1", "sqnr_db", "nonfinite")
        if f"{prefix}{m}" in row.index
    }


def assign_methods(
    table: pd.DataFrame,
    thresholds: Thresholds | None = None,
    *,
    margin: float = DEFAULT_SQ_MARGIN,
    forced_fp: Iterable[str] = (),
    forced_reason: str = "listed in the user's exclusion file",
) -> dict[str, Rule]:
    """One rule per layer (in table order) with its method and measured reason."""
    thresholds = thresholds or Thresholds()
    forced = set(forced_fp)
    naive_bad = exclude_by_thresholds(table, thresholds)
    has_sq = "iso_sq_rel_l1" in table.columns
    sq_bad = exclude_by_thresholds(table, thresholds, method="sq") if has_sq else {}
    rules: dict[str, Rule] = {}
    for name, row in table.iterrows():
        layer = str(name)
        naive_metrics = _metrics(row, "iso_naive_")
        if layer in forced:
            rules[layer] = Rule(match=layer, method="fp", reason=forced_reason, metrics=naive_metrics)
            continue
        sq: _Sq | None = None
        if (
            has_sq
            and isinstance(row.get("sq_granularity"), str)
            and math.isfinite(float(row["iso_sq_rel_l1"]))
        ):
            sq = _Sq(
                float(row["sq_alpha"]),
                row["sq_granularity"],
                str(row["sq_mode"]),
                float(row["iso_sq_rel_l1"]),
            )
        naive_rel = float(row["iso_naive_rel_l1"])
        sq_ok = sq is not None and layer not in sq_bad
        naive_ok = layer not in naive_bad
        if sq is not None and sq_ok and (not naive_ok or sq.rel_l1 <= margin * naive_rel):
            research = " (research: not deployable)" if sq.granularity == "im2col" else ""
            reason = (
                f"SmoothQuant alpha {sq.alpha:g} ({sq.granularity}, {sq.mode}) cuts isolated relative L1 "
                f"{naive_rel:.3g} -> {sq.rel_l1:.3g}{research}"
            )
            rules[layer] = Rule(
                match=layer,
                method="smoothquant",
                alpha=sq.alpha,
                granularity=sq.granularity,
                mode=sq.mode,
                reason=reason,
                metrics={**naive_metrics, **_metrics(row, "iso_sq_")},
            )
        elif naive_ok:
            reason = ""
            if sq is not None:
                reason = (
                    f"SmoothQuant best relative L1 {sq.rel_l1:.3g} vs naive {naive_rel:.3g}: not worth it"
                )
            rules[layer] = Rule(match=layer, method="naive", reason=reason, metrics=naive_metrics)
        else:
            reason = naive_bad[layer].reason
            if sq is not None:
                why = sq_bad[layer].reason if layer in sq_bad else "passes"
                reason += f"; SmoothQuant alpha {sq.alpha:g}: {why}"
            rules[layer] = Rule(
                match=layer, method="fp", reason=reason, metrics={**naive_metrics, **_metrics(row, "iso_sq_")}
            )
    return rules
