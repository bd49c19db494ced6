"""The report figures' shared look and axes: colours, the layer axis, log / linear limits, grids."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

from sensitivity.report.data import ReportData

__all__ = [
    "COLORS",
    "EXCLUDED_BAND",
    "EXTRA_COLORS",
    "MAX_NAMED_TICKS",
    "NONFINITE",
    "STYLE",
    "WIDTH_IN",
    "clip_lin",
    "clip_log",
    "excluded_legend",
    "grid",
    "label",
    "layer_axis",
    "legend",
    "lin_limits",
    "log_limits",
    "method_color",
    "no_minor_ticks",
    "short_name",
    "style",
    "values",
]  # fmt: skip

STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.titleweight": "bold",
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#9aa3ad",
    "axes.labelcolor": "#2b3440",
    "axes.grid": True,
    "grid.color": "#e3e7ec",
    "grid.linewidth": 0.7,
    "xtick.color": "#4a5563",
    "ytick.color": "#4a5563",
    "legend.frameon": False,
    "legend.fontsize": 8,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}
COLORS = {
    "naive": "#e4572e",
    "sq": "#2e86ab",
    "sqi": "#8e6bbf",
    "smoothquant": "#2e86ab",
    "policy": "#2a9d5c",
}
EXTRA_COLORS = ("#c08a1e", "#5d6d7e", "#d1495b", "#00798c", "#7a9e2b")
EXCLUDED_BAND = "#f8d7d3"
NONFINITE = "#b3261e"
WIDTH_IN = 10.5
MAX_NAMED_TICKS = 40


def method_color(method: str, index: int) -> str:
    return COLORS.get(method, EXTRA_COLORS[index % len(EXTRA_COLORS)])


def label(method: str) -> str:
    labels = {
        "sq": "SmoothQuant",
        "sqi": "SmoothQuant im2col",
        "naive": "naive",
        "policy": "policy",
        "fp": "FP",
    }
    return labels.get(method, method)


@contextmanager
def style() -> Iterator[None]:
    with mpl.rc_context(STYLE):
        yield


def values(data: ReportData, mode: str, method: str, metric: str) -> np.ndarray:
    col = data.column(mode, method, metric)
    if col is None:
        return np.full(len(data.table), np.nan)
    return col.to_numpy(dtype=float, na_value=np.nan)


def short_name(name: str, limit: int = 30) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def layer_axis(ax: Axes, data: ReportData, mark_nonfinite: bool = True) -> None:
    """x = execution order; names as ticks when they fit; excluded layers banded, non-finite marked."""
    n = len(data.table)
    names = data.names
    excluded = set(data.excluded)
    ax.set_xlim(-0.6, n - 0.4)
    ax.grid(axis="x", visible=False)
    for i, name in enumerate(names):
        if name in excluded:
            ax.axvspan(i - 0.5, i + 0.5, color=EXCLUDED_BAND, zorder=0, lw=0)
    if n <= MAX_NAMED_TICKS:
        ax.set_xticks(range(n))
        ax.set_xticklabels([short_name(s) for s in names], rotation=60, ha="right", fontsize=7)
        for tick, name in zip(ax.get_xticklabels(), names, strict=True):
            if name in excluded:
                tick.set_color(NONFINITE)
                tick.set_fontweight("bold")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=20, integer=True))
        ax.set_xlabel("layer (execution order)")
    if mark_nonfinite:
        bad = [names.index(n) for n in data.nonfinite_layers()]
        if bad:
            ax.scatter(
                bad,
                [1.0] * len(bad),
                marker="v",
                s=36,
                color=NONFINITE,
                transform=ax.get_xaxis_transform(),
                clip_on=False,
                zorder=5,
                label="NaN/Inf",
            )


def log_limits(ax: Axes, arrays: Sequence[np.ndarray], floor: float = 1e-7) -> tuple[float, float]:
    finite = np.concatenate([a[np.isfinite(a) & (a > 0)] for a in arrays] or [np.array([])])
    if finite.size == 0:
        lo, hi = 1e-4, 1.0
    else:
        lo, hi = max(float(finite.min()) / 2, floor), float(finite.max()) * 3
    if hi / lo < 30:  # at least ~1.5 decades, so a labelled power of ten is always in view
        mid = math.sqrt(lo * hi)
        lo, hi = mid / math.sqrt(30), mid * math.sqrt(30)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    no_minor_ticks(ax.yaxis)
    return lo, hi


def no_minor_ticks(axis: Axis) -> None:
    """No minor ticks on a log axis whose decades are labelled (`log_limits` keeps one in view): their
    labels were hidden anyway, and laying out their tick texts took a fifth of the report's drawing time
    (ResNet-50 shapes: 2.6 -> 2.1 s over the seven plots)."""
    axis.set_minor_locator(NullLocator())


def clip_log(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """+inf drawn at the top edge, zero (exact) at the bottom, NaN left as gaps."""
    out = values.astype(float).copy()
    out[np.isposinf(out)] = hi
    out[(out <= 0) & np.isfinite(out)] = lo
    return out


def legend(ax: Axes) -> None:
    """Outside, right of the axes: never covers data, whatever the values."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0, handlelength=2.2)


def excluded_legend(ax: Axes, data: ReportData) -> None:
    if data.excluded:
        ax.fill_between([], [], color=EXCLUDED_BAND, label="excluded")


def lin_limits(values: np.ndarray) -> tuple[float, float]:
    """dB axis limits from the finite values, padded, always including 0 dB."""
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 60.0
    pad = max(3.0, 0.08 * (hi - lo))
    return min(lo - pad, 0.0), hi + pad


def clip_lin(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """±inf (exact match / no signal) drawn at the axis edges."""
    out = values.astype(float).copy()
    out[np.isposinf(out)] = hi
    out[np.isneginf(out)] = lo
    return out


def grid(n: int, cols: int, height: float) -> tuple[Figure, list[Axes]]:
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(WIDTH_IN, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]
