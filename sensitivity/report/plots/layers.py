"""Per-layer figures: relative L1 (isolated markers, cumulative lines), SQNR, and cumulative error growth."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from sensitivity.report.data import ReportData
from sensitivity.report.plots.style import (
    MAX_NAMED_TICKS,
    NONFINITE,
    WIDTH_IN,
    clip_lin,
    clip_log,
    excluded_legend,
    label,
    layer_axis,
    legend,
    lin_limits,
    log_limits,
    method_color,
    style,
    values,
)

__all__ = ["plot_cumulative", "plot_layer_error", "plot_sqnr"]


def plot_layer_error(data: ReportData) -> Figure | None:
    """Relative L1 per layer (log): isolated per method as markers, cumulative per method as lines."""
    iso = data.methods("iso")
    cum = data.methods("cum")
    if not iso and not cum:
        return None
    with style():
        fig = Figure(figsize=(WIDTH_IN, 3.9), layout="constrained")
        ax = fig.add_subplot()
        series = [("iso", m) for m in iso] + [("cum", m) for m in cum]
        arrays = [values(data, mode, m, "rel_l1") for mode, m in series]
        lo, hi = log_limits(ax, arrays)
        x = np.arange(len(data.table))
        markers = "osD^P*"
        for i, ((mode, method), y) in enumerate(zip(series, arrays, strict=True)):
            color = method_color(method, i)
            y = clip_log(y, lo, hi)
            if mode == "iso":
                ax.plot(
                    x,
                    y,
                    ls="none",
                    marker=markers[i % len(markers)],
                    ms=5.5 if len(x) <= MAX_NAMED_TICKS else 3.5,
                    color=color,
                    label=f"isolated · {label(method)}",
                    zorder=3,
                )
            else:
                ax.plot(
                    x,
                    y,
                    ls="--" if method == "naive" else "-",
                    lw=1.6,
                    color=color,
                    alpha=0.9,
                    label=f"cumulative · {label(method)}",
                    zorder=2.5 if method == "naive" else 2,
                )
        limit = data.threshold("max_rel_l1")
        if limit is not None and lo < limit < hi * 10:
            ax.axhline(limit, color="#6b7785", ls=":", lw=1.2, label=f"exclusion threshold {limit:g}")
        ax.set_ylabel("relative L1 (log)")
        ax.set_title("Per-layer error: relative L1 to the FP output")
        layer_axis(ax, data)
        excluded_legend(ax, data)
        legend(ax)
    return fig


def plot_sqnr(data: ReportData) -> Figure | None:
    """Isolated SQNR per layer and method (bars), with the exclusion threshold."""
    methods = data.methods("iso", "sqnr_db")
    if not methods:
        return None
    with style():
        fig = Figure(figsize=(WIDTH_IN, 3.6), layout="constrained")
        ax = fig.add_subplot()
        arrays = [values(data, "iso", m, "sqnr_db") for m in methods]
        lo, hi = lin_limits(np.concatenate(arrays))
        x = np.arange(len(data.table))
        width = 0.8 / len(methods)
        for i, (method, y) in enumerate(zip(methods, arrays, strict=True)):
            ax.bar(
                x - 0.4 + width * (i + 0.5),
                clip_lin(y, lo, hi),
                width=width * 0.92,
                color=method_color(method, i),
                alpha=0.9,
                label=f"isolated · {label(method)}",
                zorder=3,
            )
        limit = data.threshold("min_sqnr_db")
        if limit is not None:
            ax.axhline(limit, color="#6b7785", ls=":", lw=1.2, label=f"exclusion threshold {limit:g} dB")
        ax.set_ylim(lo, hi)
        ax.axhline(0, color="#9aa3ad", lw=0.8)
        ax.set_ylabel("SQNR (dB, higher is better)")
        ax.set_title("Per-layer SQNR, each layer quantized alone")
        layer_axis(ax, data)
        excluded_legend(ax, data)
        legend(ax)
    return fig


def plot_cumulative(data: ReportData) -> Figure | None:
    """Cumulative SQNR along the execution order: how error builds up with the whole model quantized."""
    methods = data.methods("cum", "sqnr_db")
    if not methods:
        return None
    with style():
        fig = Figure(figsize=(WIDTH_IN, 3.6), layout="constrained")
        ax = fig.add_subplot()
        arrays = [values(data, "cum", m, "sqnr_db") for m in methods]
        ref = values(data, "iso", "naive", "sqnr_db")
        lo, hi = lin_limits(np.concatenate([*arrays, ref]))
        x = np.arange(len(data.table))
        if np.isfinite(ref).any():
            ax.plot(
                x,
                clip_lin(ref, lo, hi),
                color="#aab3bd",
                lw=1,
                ls=":",
                marker=".",
                ms=4,
                label="isolated · naive (reference)",
            )
        for i, (method, y) in enumerate(zip(methods, arrays, strict=True)):
            naive = method == "naive"  # dashed and on top: visible where the policy's line coincides
            ax.plot(
                x,
                clip_lin(y, lo, hi),
                color=method_color(method, i),
                lw=1.8 if naive else 2.2,
                ls="--" if naive else "-",
                marker="o",
                ms=3.5 if naive else 4,
                zorder=4 if naive else 3,
                label=f"cumulative · {label(method)}",
            )
        ax.set_ylim(lo, hi)
        ax.set_ylabel("SQNR at the layer output (dB)")
        ax.set_title("Cumulative error growth: the whole model quantized")
        first = data.scan.get("first_nonfinite")
        if first in data.names:
            ax.axvline(
                data.names.index(first), color=NONFINITE, ls=":", lw=1.4, label="first NaN/Inf (all naive)"
            )
        elif first:
            ax.set_title(f"Cumulative error growth: the whole model quantized (first NaN/Inf at {first})")
        layer_axis(ax, data)
        excluded_legend(ax, data)
        legend(ax)
    return fig
