"""`assign_methods` on its own: the margin, the thresholds, FP with both reasons, the user's list."""

from __future__ import annotations

import pandas as pd

from sensitivity.policy import Thresholds, assign_methods


def _table(rows: dict[str, tuple[float, float | None]]) -> pd.DataFrame:
    """layer -> (naive rel L1, SmoothQuant rel L1 or None); SQNR follows from rel L1 for the test."""
    data = []
    for name, (naive, sq) in rows.items():
        row = {"name": name, "iso_naive_rel_l1": naive, "iso_naive_sqnr_db": 40.0 if naive < 0.1 else 5.0,
               "iso_naive_nonfinite": 0.0}  # fmt: skip
        if sq is not None:
            row.update(iso_sq_rel_l1=sq, iso_sq_sqnr_db=40.0 if sq < 0.1 else 5.0, iso_sq_nonfinite=0.0,
                       sq_alpha=0.5, sq_granularity="channel", sq_mode="static")  # fmt: skip
        data.append(row)
    return pd.DataFrame(data).set_index("name", drop=False)


def test_methods_and_reasons() -> None:
    table = _table({
        "plain": (0.02, 0.015),  # SmoothQuant not worth it (does not halve)
        "halved": (0.04, 0.01),  # SmoothQuant halves a healthy layer: taken
        "rescued": (0.5, 0.05),  # naive fails, SmoothQuant passes
        "hopeless": (0.5, 0.4),  # both fail: FP with both reasons
        "nosq": (0.03, None),
        "listed": (0.01, 0.001),
    })  # fmt: skip
    rules = assign_methods(table, Thresholds(), margin=0.5, forced_fp=["listed"])
    assert {n: r.method for n, r in rules.items()} == {
        "plain": "naive", "halved": "smoothquant", "rescued": "smoothquant", "hopeless": "fp", "nosq": "naive",
        "listed": "fp",
    }  # fmt: skip
    assert "not worth it" in rules["plain"].reason
    assert "0.04 -> 0.01" in rules["halved"].reason and rules["halved"].alpha == 0.5
    assert (
        "relative L1 0.5 > 0.15" in rules["hopeless"].reason
        and "SmoothQuant alpha 0.5" in rules["hopeless"].reason
    )
    assert rules["listed"].reason == "listed in the user's exclusion file"
