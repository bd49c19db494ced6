"""The LayerTable: one row per target layer in execution order, as a pandas DataFrame."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from sensitivity.capture.observe import LayerObserver
from sensitivity.capture.passes import PassResult
from sensitivity.metrics import ErrorStats
from sensitivity.prepare import LayerInfo

__all__ = ["build_table"]


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def build_table(
    layers: Sequence[LayerInfo],
    observers: dict[str, LayerObserver],
    result: PassResult,
    methods: Sequence[str] = ("naive",),
    extra_iso: Sequence[str] = (),
) -> pd.DataFrame:
    """Rows in execution order; metrics `{iso,cum}_{method}_{metric}` plus layer facts and input stats."""
    rows = []
    for layer in layers:
        obs = observers[layer.name]
        row: dict[str, object] = {
            "name": layer.name,
            "type": layer.type,
            "order": layer.order,
            "in_shape": _shape(layer.in_shape),
            "out_shape": _shape(layer.out_shape),
            "weight_shape": _shape(layer.weight_shape),
            "macs": layer.macs,
            "calls": result.calls.get(layer.name, 0),
            "folded_bn": layer.folded_bn,
            "input_min": obs.min_value if obs.batches else math.nan,
            "input_absmax": obs.max_abs,
            "act_unsigned": obs.unsigned(),
            "outlier_ratio": obs.outlier_ratio(),
        }
        for method in methods:
            for mode, stats in (
                ("iso", result.iso.get((layer.name, method), ErrorStats())),
                ("cum", result.cum.get(layer.name, ErrorStats()) if method == "naive" else ErrorStats()),
            ):
                for key, value in stats.metrics().items():
                    row[f"{mode}_{method}_{key}"] = value
        for cand in extra_iso:
            stats = result.iso.get((layer.name, cand))
            for key in ("rel_l1", "sqnr_db"):
                row[f"iso_{cand}_{key}"] = stats.metrics()[key] if stats is not None else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table.index = pd.Index(table["name"], name="layer")
    return table
