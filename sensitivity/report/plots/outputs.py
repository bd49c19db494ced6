"""Output-referred figures: each layer's cost at the model's outputs, the curve "output error vs layers kept
in FP" (predicted, and measured where a pass ran), and predicted against measured per layer."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from sensitivity.report.data import ReportData
from sensitivity.report.plots.style import (
    COLORS,
    NONFINITE,
    WIDTH_IN,
    clip_log,
    layer_axis,
    legend,
    log_limits,
    short_name,
    style,
)

__all__ = ["plot_fp_curve", "plot_output_error", "plot_predicted_vs_measured"]


def _column(data: ReportData, key: str) -> np.ndarray | None:
    col = data.table.get(key)
    return None if col is None else np.asarray(col, dtype=float)


def plot_output_error(data: ReportData) -> Figure | None:
    """Per layer (execution order): its output error alone, naive and with its best candidate (log)."""
    naive = _column(data, "out_naive_err")
    if naive is None or not np.isfinite(naive).any():
        return None
    best = np.array(
        [
            float(row.get(f"out_{row.get('out_best', 'naive')}_err", row["out_naive_err"]))
            for row in data.table.to_dict(orient="records")
        ]
    )
    exact = _column(data, "out_exact_err")
    with style():
        fig = Figure(figsize=(WIDTH_IN, 3.9), layout="constrained")
        ax = fig.add_subplot()
        arrays = [naive, best] + ([exact] if exact is not None else [])
        lo, hi = log_limits(ax, arrays, floor=1e-12)
        x = np.arange(len(naive))
        ax.plot(x, clip_log(naive, lo, hi), ls="none", marker="o", ms=5, color=COLORS["naive"], label="naive")
        ax.plot(
            x, clip_log(best, lo, hi), ls="none", marker="v", ms=5, color=COLORS["sq"], label="best candidate"
        )
        if exact is not None and np.isfinite(exact).any():
            ax.plot(
                x,
                clip_log(exact, lo, hi),
                ls="none",
                marker="x",
                ms=7,
                color="#222222",
                label="measured alone",
            )
        ax.set_ylabel("relative output MSE (layer alone)")
        layer_axis(ax, data)
        legend(ax)
    return fig


def plot_fp_curve(data: ReportData) -> Figure | None:
    """Relative output MSE as the FP layers are added in rank order, every other layer naive: predicted
    (line), measured (markers) where the scan ran a pass; then the policy (its methods on the other layers)."""
    curve = [p for p in data.scan.get("fp_curve") or [] if isinstance(p, dict)]
    steps = [p for p in curve if not p.get("policy")]
    if len(steps) < 2:
        return None
    k = np.array([int(p.get("fp_layers", i)) for i, p in enumerate(steps)])
    pred = np.array([_num(p.get("predicted")) for p in steps])
    meas = np.array([_num(p.get("measured")) for p in steps])
    with style():
        fig = Figure(figsize=(WIDTH_IN * 0.7, 3.6), layout="constrained")
        ax = fig.add_subplot()
        ax.plot(
            k, pred, marker=".", color=COLORS["naive"], label="predicted, others naive (sum of layers alone)"
        )
        ok = np.isfinite(meas)
        ax.plot(
            k[ok], meas[ok], ls="none", marker="D", ms=7, color=NONFINITE, label="measured (quantized pass)"
        )
        for p in curve:
            if p.get("policy"):
                x = int(p.get("fp_layers", k[-1]))
                ax.plot([x], [_num(p.get("predicted"))], ls="none", marker="*", ms=11, color=COLORS["policy"],
                        label="policy (its methods on the others): predicted")  # fmt: skip
                ax.plot([x], [_num(p.get("measured"))], ls="none", marker="*", ms=11, mfc="none",
                        color=NONFINITE, label="policy: measured")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("layers kept in FP (ranked by naive output error)")
        ax.set_ylabel("relative output MSE")
        ax.set_xticks(k)
        labels = ["0"] + [
            f"{i}\n{short_name(str(p.get('layer', '')), 18)}" for i, p in zip(k[1:], steps[1:], strict=True)
        ]
        ax.set_xticklabels(
            labels,
            fontsize=7,
            rotation=30 if len(steps) > 4 else 0,
            ha="right" if len(steps) > 4 else "center",
        )
        legend(ax)
    return fig


def plot_predicted_vs_measured(data: ReportData) -> Figure | None:
    """The probes' prediction against the exact measurement, for the layers measured both ways."""
    rows = []
    for row in data.table.to_dict(orient="records"):
        key = row.get("out_best", "naive")
        pred = _num(row.get(f"out_{key}_err"))
        meas = _num(row.get("out_exact_err"))
        if math.isfinite(pred) and math.isfinite(meas) and pred > 0 and meas > 0:
            rows.append((str(row["name"]), pred, meas))
    if len(rows) < 2:
        return None
    pred = np.array([r[1] for r in rows])
    meas = np.array([r[2] for r in rows])
    with style():
        fig = Figure(figsize=(5.2, 4.4), layout="constrained")
        ax = fig.add_subplot()
        lo = float(min(pred.min(), meas.min())) / 2
        hi = float(max(pred.max(), meas.max())) * 2
        ax.plot([lo, hi], [lo, hi], color="#9aa5b1", lw=1, ls="--", label="prediction = measurement")
        ax.plot(pred, meas, ls="none", marker="o", color=COLORS["naive"])
        for name, p, m in rows:
            ax.annotate(short_name(name, 22), (p, m), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("predicted (output probes, first order)")
        ax.set_ylabel("measured (layer quantized alone)")
        legend(ax)
    return fig


def _num(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan
