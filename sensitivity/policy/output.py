"""Policy v2: decided by each layer's predicted effect on the model's outputs.

Per layer, the candidate with the least output error (`out_<candidate>_err`: naive with the spec's range,
naive with another calibrator's, SmoothQuant per alpha) wins; anything but plain naive must beat naive by
`OUTPUT_MARGIN` and save `FP_FLOOR` of what the quantized layers leave, so prediction noise does not buy
complexity. The FP budget goes to the layers whose option (the scan passes each layer's naive one:
an FP slot's gain is then certain, not a prediction of another candidate's) costs the most: to first order
the layers' output errors add up, so which layers to keep in FP is a 0/1 knapsack (value: the error
removed; weight: one layer, and its MACs under a MAC budget). Layers below `FP_FLOOR` of the total
predicted error are never worth an FP slot, and a model whose layers together predict less than
`NEGLIGIBLE_ERROR` stays all naive (`negligible`). No change (an FP slot, another candidate) is worth less
than `NEGLIGIBLE_ERROR` / L of output error: L such changes together could not matter.

Pure: the caller measures (the scan verifies the result on held-out batches and corrects it on measured
errors, `sensitivity.pipeline.decide`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sensitivity.methods.base import deployable

__all__ = [
    "FP_FLOOR",
    "NEGLIGIBLE_ERROR",
    "OUTPUT_MARGIN",
    "LayerOption",
    "best_options",
    "choose_fp",
    "negligible",
    "selectable",
]

#: A candidate other than plain naive must predict at most this fraction less output error than naive...
OUTPUT_MARGIN = 0.2
#: ... and save at least this share of the model's total; a layer goes to FP only if its best candidate
#: predicts at least this share of the total.
FP_FLOOR = 0.01
#: All layers' naive output errors together below this relative output MSE (the quantized model's outputs
#: 40 dB above their error, where no task metric moves): nothing to repair, every layer stays naive.
NEGLIGIBLE_ERROR = 1e-4
#: MAC budgets are solved on this many weight units (rounded up: the answer never exceeds the budget)
_MAC_UNITS = 1000


@dataclass(frozen=True)
class LayerOption:
    """A layer's best quantized candidate, its predicted (or exactly measured) output error, its cost."""

    layer: str
    key: str
    error: float
    naive_error: float
    macs: int


def selectable(key: str, sq_mode: str) -> bool:
    """Candidates a deployable policy may pick (`deployable`): naive (any range), SmoothQuant per channel
    (static, or the scan's dynamic mode when asked for)."""
    return deployable(key)


def best_options(
    table: pd.DataFrame,
    sq_mode: str = "static",
    margin: float = OUTPUT_MARGIN,
    floor: float = FP_FLOOR,
    fp: Collection[str] = (),
) -> dict[str, LayerOption]:
    """Each layer's best candidate by its `out_*_err` columns (NaN where nothing was predicted: naive). A
    candidate replaces plain naive only when it cuts the layer's error by `margin` and saves at least
    `floor` of the error the quantized layers leave (each at its least, the layers in `fp` not counted): no
    SmoothQuant or clipped range for a negligible gain."""
    columns = {c[4:-4]: c for c in table.columns if c.startswith("out_") and c.endswith("_err")}
    keys = [k for k in columns if selectable(k, sq_mode)]
    errors = table[[columns[k] for k in keys]].astype(float) if keys else pd.DataFrame(index=table.index)
    least = errors.where(np.isfinite(errors)).min(axis=1, skipna=True)
    total = float(least[[n not in set(fp) for n in least.index]].sum()) if len(least) else 0.0
    least_change = NEGLIGIBLE_ERROR / max(len(table), 1)
    out: dict[str, LayerOption] = {}
    for name, row in table.iterrows():
        layer = str(name)
        naive = float(row[columns["naive"]]) if "naive" in columns else math.nan
        best_key, best = "naive", naive
        for key in keys:
            value = float(row[columns[key]])
            if key == "naive" or math.isnan(value):
                continue
            gain = naive - value
            worth = value <= (1.0 - margin) * naive and gain >= floor * total and gain >= least_change

            if math.isnan(best) or (value < best and worth):
                best_key, best = key, value
        out[layer] = LayerOption(layer, best_key, best, naive, int(row.get("macs", 0) or 0))
    return out


def negligible(table: pd.DataFrame, limit: float = NEGLIGIBLE_ERROR) -> float | None:
    """The predicted all-naive output error (the layers' `out_naive_err` summed) when it is below `limit`,
    else None: a model quantization barely touches needs no FP layer and no other candidate."""
    if "out_naive_err" not in table.columns:
        return None
    errors = table["out_naive_err"].astype(float)
    if errors.isna().all() or not np.isfinite(errors.fillna(0.0)).all():
        return None
    total = float(errors.sum(skipna=True))
    return total if total < limit else None


def _value(option: LayerOption) -> float:
    """Knapsack value: the error a layer's FP slot removes (non-finite predictions first of all)."""
    if math.isnan(option.error):
        return 0.0
    return 1e30 if math.isinf(option.error) else option.error


def choose_fp(
    options: Mapping[str, LayerOption],
    candidates: Sequence[str],
    max_layers: int,
    max_macs: float | None = None,
    floor: float = FP_FLOOR,
) -> list[str]:
    """The layers (of `candidates`) to keep in FP: the most predicted output error removed with at most
    `max_layers` layers and, if given, at most `max_macs` (a fraction) of all layers' MACs."""
    total = sum(o.error for o in options.values() if math.isfinite(o.error))  # non-finite ones always count
    least = max(floor * total, NEGLIGIBLE_ERROR / max(len(options), 1))
    items = [n for n in candidates if _value(options[n]) > 0 and _value(options[n]) >= least]
    if max_layers <= 0 or not items:
        return []
    if max_macs is None:
        return sorted(items, key=lambda n: _value(options[n]), reverse=True)[:max_layers]
    all_macs = sum(max(o.macs, 0) for o in options.values()) or 1
    units = [math.ceil(_MAC_UNITS * max(options[n].macs, 0) / all_macs) for n in items]
    return _knapsack(
        items, [_value(options[n]) for n in items], units, max_layers, int(_MAC_UNITS * max_macs)
    )


def _knapsack(
    items: list[str], values: list[float], units: list[int], count: int, capacity: int
) -> list[str]:
    """0/1 knapsack with two limits (at most `count` items, total `units` <= `capacity`), exact by dynamic
    programming over (items taken, units used)."""
    neg = -np.inf
    best = np.full((count + 1, capacity + 1), neg)
    best[0, 0] = 0.0
    took = np.zeros((len(items), count + 1, capacity + 1), dtype=bool)
    for i, (v, w) in enumerate(zip(values, units, strict=True)):
        if w > capacity:
            continue
        for c in range(count, 0, -1):
            cand = best[c - 1, : capacity + 1 - w] + v
            target = best[c, w:]
            better = cand > target
            target[better] = cand[better]
            took[i, c, w:] = better
    c, m = np.unravel_index(int(np.argmax(best)), best.shape)
    chosen = []
    for i in range(len(items) - 1, -1, -1):
        if c > 0 and took[i, c, m]:
            chosen.append(items[i])
            c, m = c - 1, m - units[i]
    return [n for n in items if n in set(chosen)]
