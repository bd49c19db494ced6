"""`build_table`: one row per layer in execution order, its facts and every measured metric column."""

from __future__ import annotations

import math

import torch

from sensitivity.capture.observe import LayerObserver
from sensitivity.capture.passes import PassResult
from sensitivity.prepare import LayerInfo
from sensitivity.spec import METRICS, QuantSpec
from sensitivity.table import build_table


def test_rows_columns_and_values() -> None:
    layers = [
        LayerInfo("b", "Conv2d", 0, (2, 2, 1, 1), (1, 2, 3, 3), (1, 2, 3, 3), 36),
        LayerInfo("a", "Linear", 1, (3, 2)),
    ]
    obs = {"b": LayerObserver(QuantSpec(), 1), "a": LayerObserver(QuantSpec(), -1)}
    obs["b"].observe(torch.ones(1, 2, 3, 3))
    res = PassResult()
    res.iso[("b", "naive")].update(torch.ones(4), torch.ones(4) * 1.5)
    res.iso[("b", "unsigned")].update(torch.ones(4), torch.ones(4))
    res.cum["b"].update(torch.ones(4), torch.ones(4) * 2)
    res.calls["b"] = 1
    t = build_table(layers, obs, res, extra_iso=["unsigned"])
    assert list(t.index) == ["b", "a"] and list(t["order"]) == [0, 1]
    assert t.loc["b", "in_shape"] == "1x2x3x3" and t.loc["b", "macs"] == 36 and t.loc["b", "calls"] == 1
    assert all(f"{m}_naive_{k}" in t.columns for m in ("iso", "cum") for k in METRICS)
    assert t.loc["b", "iso_naive_rel_l1"] == 0.5 and t.loc["b", "cum_naive_rel_l1"] == 1.0
    assert t.loc["b", "iso_unsigned_sqnr_db"] == math.inf
    assert math.isnan(t.loc["a", "iso_naive_rel_l1"]) and math.isnan(t.loc["a", "input_min"])
