"""The report's figures, drawn from a `ReportData` with matplotlib's object API and the Agg canvas.

No pyplot: figures never touch the global backend, so the same functions render PNGs for report.html and
show inline in a notebook. Each function returns a `Figure`, or None when its data is absent (e.g. no
alpha sweeps in a scan run without SmoothQuant), and the report leaves that plot out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

from sensitivity.report.data import ReportData

__all__ = [
    "PLOTS",
    "Plot",
    "figure_png",
    "plot_alpha_sweeps",
    "plot_channel_profiles",
    "plot_cumulative",
    "plot_histograms",
    "plot_layer_error",
    "plot_sqnr",
    "render_plots",
]

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


def _color(method: str, index: int) -> str:
    return COLORS.get(method, EXTRA_COLORS[index % len(EXTRA_COLORS)])


def _label(method: str) -> str:
    labels = {
        "sq": "SmoothQuant",
        "sqi": "SmoothQuant im2col",
        "naive": "naive",
        "policy": "policy",
        "fp": "FP",
    }
    return labels.get(method, method)


@contextmanager
def _style() -> Iterator[None]:
    with mpl.rc_context(STYLE):
        yield


def _values(data: ReportData, mode: str, method: str, metric: str) -> np.ndarray:
    col = data.column(mode, method, metric)
    if col is None:
        return np.full(len(data.table), np.nan)
    return col.to_numpy(dtype=float, na_value=np.nan)


def _short(name: str, limit: int = 30) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1) :]


def _layer_axis(ax: Axes, data: ReportData, mark_nonfinite: bool = True) -> None:
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
        ax.set_xticklabels([_short(s) for s in names], rotation=60, ha="right", fontsize=7)
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


def _log_limits(ax: Axes, arrays: Sequence[np.ndarray], floor: float = 1e-7) -> tuple[float, float]:
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
    ax.yaxis.set_minor_formatter(NullFormatter())
    return lo, hi


def _clip_log(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """+inf drawn at the top edge, zero (exact) at the bottom, NaN left as gaps."""
    out = values.astype(float).copy()
    out[np.isposinf(out)] = hi
    out[(out <= 0) & np.isfinite(out)] = lo
    return out


def plot_layer_error(data: ReportData) -> Figure | None:
    """Relative L1 per layer (log): isolated per method as markers, cumulative per method as lines."""
    iso = data.methods("iso")
    cum = data.methods("cum")
    if not iso and not cum:
        return None
    with _style():
        fig = Figure(figsize=(WIDTH_IN, 3.9), layout="constrained")
        ax = fig.add_subplot()
        series = [("iso", m) for m in iso] + [("cum", m) for m in cum]
        arrays = [_values(data, mode, m, "rel_l1") for mode, m in series]
        lo, hi = _log_limits(ax, arrays)
        x = np.arange(len(data.table))
        markers = "osD^P*"
        for i, ((mode, method), y) in enumerate(zip(series, arrays, strict=True)):
            color = _color(method, i)
            y = _clip_log(y, lo, hi)
            if mode == "iso":
                ax.plot(
                    x,
                    y,
                    ls="none",
                    marker=markers[i % len(markers)],
                    ms=5.5 if len(x) <= MAX_NAMED_TICKS else 3.5,
                    color=color,
                    label=f"isolated · {_label(method)}",
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
                    label=f"cumulative · {_label(method)}",
                    zorder=2.5 if method == "naive" else 2,
                )
        limit = data.threshold("max_rel_l1")
        if limit is not None and lo < limit < hi * 10:
            ax.axhline(limit, color="#6b7785", ls=":", lw=1.2, label=f"exclusion threshold {limit:g}")
        ax.set_ylabel("relative L1 (log)")
        ax.set_title("Per-layer error: relative L1 to the FP output")
        _layer_axis(ax, data)
        _excluded_legend(ax, data)
        _legend(ax)
    return fig


def _legend(ax: Axes) -> None:
    """Outside, right of the axes: never covers data, whatever the values."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0, handlelength=2.2)


def _excluded_legend(ax: Axes, data: ReportData) -> None:
    if data.excluded:
        ax.fill_between([], [], color=EXCLUDED_BAND, label="excluded")


def _lin_limits(values: np.ndarray) -> tuple[float, float]:
    """dB axis limits from the finite values, padded, always including 0 dB."""
    finite = values[np.isfinite(values)]
    lo = float(finite.min()) if finite.size else 0.0
    hi = float(finite.max()) if finite.size else 60.0
    pad = max(3.0, 0.08 * (hi - lo))
    return min(lo - pad, 0.0), hi + pad


def _clip_lin(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """±inf (exact match / no signal) drawn at the axis edges."""
    out = values.astype(float).copy()
    out[np.isposinf(out)] = hi
    out[np.isneginf(out)] = lo
    return out


def plot_sqnr(data: ReportData) -> Figure | None:
    """Isolated SQNR per layer and method (bars), with the exclusion threshold."""
    methods = data.methods("iso", "sqnr_db")
    if not methods:
        return None
    with _style():
        fig = Figure(figsize=(WIDTH_IN, 3.6), layout="constrained")
        ax = fig.add_subplot()
        arrays = [_values(data, "iso", m, "sqnr_db") for m in methods]
        lo, hi = _lin_limits(np.concatenate(arrays))
        x = np.arange(len(data.table))
        width = 0.8 / len(methods)
        for i, (method, y) in enumerate(zip(methods, arrays, strict=True)):
            ax.bar(
                x - 0.4 + width * (i + 0.5),
                _clip_lin(y, lo, hi),
                width=width * 0.92,
                color=_color(method, i),
                alpha=0.9,
                label=f"isolated · {_label(method)}",
                zorder=3,
            )
        limit = data.threshold("min_sqnr_db")
        if limit is not None:
            ax.axhline(limit, color="#6b7785", ls=":", lw=1.2, label=f"exclusion threshold {limit:g} dB")
        ax.set_ylim(lo, hi)
        ax.axhline(0, color="#9aa3ad", lw=0.8)
        ax.set_ylabel("SQNR (dB, higher is better)")
        ax.set_title("Per-layer SQNR, each layer quantized alone")
        _layer_axis(ax, data)
        _excluded_legend(ax, data)
        _legend(ax)
    return fig


def plot_cumulative(data: ReportData) -> Figure | None:
    """Cumulative SQNR along the execution order: how error builds up with the whole model quantized."""
    methods = data.methods("cum", "sqnr_db")
    if not methods:
        return None
    with _style():
        fig = Figure(figsize=(WIDTH_IN, 3.6), layout="constrained")
        ax = fig.add_subplot()
        arrays = [_values(data, "cum", m, "sqnr_db") for m in methods]
        ref = _values(data, "iso", "naive", "sqnr_db")
        lo, hi = _lin_limits(np.concatenate([*arrays, ref]))
        x = np.arange(len(data.table))
        if np.isfinite(ref).any():
            ax.plot(
                x,
                _clip_lin(ref, lo, hi),
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
                _clip_lin(y, lo, hi),
                color=_color(method, i),
                lw=1.8 if naive else 2.2,
                ls="--" if naive else "-",
                marker="o",
                ms=3.5 if naive else 4,
                zorder=4 if naive else 3,
                label=f"cumulative · {_label(method)}",
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
        _layer_axis(ax, data)
        _excluded_legend(ax, data)
        _legend(ax)
    return fig


def _grid(n: int, cols: int, height: float) -> tuple[Figure, list[Axes]]:
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(WIDTH_IN, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


SWEEPS = (("alpha_sweep", "sq", "channel"), ("alpha_sweep_im2col", "sqi", "im2col (research)"))


def _sweep(data: ReportData, kind: str, layer: str) -> np.ndarray | None:
    raw = data.array(kind, layer)
    if raw is None or np.asarray(raw).size < 3:
        return None
    sweep = np.asarray(raw, dtype=float).reshape(-1, 3)
    return sweep[np.argsort(sweep[:, 0], kind="stable")]


def plot_alpha_sweeps(data: ReportData, k: int = 4) -> Figure | None:
    """SmoothQuant α sweeps (`alpha_sweep/<layer>`, and `alpha_sweep_im2col/<layer>` when present: rows
    α, iso rel L1, iso SQNR dB) of the most sensitive layers that have one, against naive."""
    layers = [
        n for n in data.worst(len(data.table)) if any(_sweep(data, s[0], n) is not None for s in SWEEPS)
    ]
    layers = layers[:k]
    if not layers:
        return None
    naive_all = _values(data, "iso", "naive", "rel_l1")
    with _style():
        fig, axes = _grid(len(layers), min(len(layers), 2), 2.8)
        for ax, name in zip(axes, layers, strict=True):
            sweeps = [(s, _sweep(data, s[0], name)) for s in SWEEPS]
            sweeps = [(s, sw) for s, sw in sweeps if sw is not None]
            naive = naive_all[data.names.index(name)]
            lo, hi = _log_limits(ax, [sw[:, 1] for _, sw in sweeps] + [np.array([naive])])
            for (_, method, label), sw in sweeps:
                alpha, rel = sw[:, 0], sw[:, 1]
                ax.plot(
                    alpha, _clip_log(rel, lo, hi), color=COLORS[method], marker="o", ms=4, lw=1.8, label=label
                )
                ok = np.isfinite(rel)
                if ok.any():
                    best = int(np.argmin(np.where(ok, rel, np.inf)))
                    ax.scatter(
                        [alpha[best]], [rel[best]], s=80, facecolor="none", edgecolor="#1b1f24", zorder=5
                    )
                    ax.annotate(
                        f"α={alpha[best]:g}",
                        (alpha[best], rel[best]),
                        textcoords="offset points",
                        xytext=(0, -13),
                        ha="center",
                        fontsize=7,
                    )
            if np.isfinite(naive) and naive > 0:
                ax.axhline(naive, color=COLORS["naive"], ls="--", lw=1.2, label="naive")
            ax.set_xlim(-0.03, 1.03)  # the whole α range, also for a one-α sweep (else a 0.48..0.52 axis)
            ax.set_xlabel("α (migration strength)")
            ax.set_ylabel("isolated rel L1 (log)")
            ax.set_title(_short(name, 48), loc="left")
            ax.legend(loc="best", fontsize=7)
        fig.suptitle("SmoothQuant α sweeps of the most sensitive layers (○ best α)", fontweight="bold")
    return fig


def _outlier_order(data: ReportData) -> list[str]:
    if "outlier_ratio" not in data.table:
        return data.names
    ratio = data.table["outlier_ratio"].to_numpy(dtype=float, na_value=np.nan)
    ratio = np.where(np.isnan(ratio), -1.0, np.where(np.isposinf(ratio), np.finfo(float).max, ratio))
    return [data.names[i] for i in np.argsort(-ratio, kind="stable")]


def plot_channel_profiles(data: ReportData, k: int = 4) -> Figure | None:
    """Per-input-channel max |X| of the layers with the highest outlier ratio: the outliers that make
    per-tensor activation scales (and so naive W8A8) fail."""
    layers = [n for n in _outlier_order(data) if data.array("chan_absmax", n) is not None]
    layers = [n for n in layers if np.asarray(data.array("chan_absmax", n)).size > 1][:k]
    if not layers:
        return None
    with _style():
        fig, axes = _grid(len(layers), min(len(layers), 2), 2.7)
        for ax, name in zip(axes, layers, strict=True):
            amax = np.asarray(data.array("chan_absmax", name), dtype=float).ravel()
            ch = np.arange(amax.size)
            med = float(np.median(amax))
            top = int(np.argmax(amax))
            outlier = amax > 8 * max(med, 1e-30)
            positive = amax[amax > 0]
            log = bool(positive.size) and positive.max() / positive.min() > 20
            floor = float(positive.min()) / 2 if log else 0.0
            shown = np.maximum(amax, floor)
            if amax.size <= 64:
                ax.bar(
                    ch,
                    shown - floor,
                    bottom=floor,
                    width=0.8,
                    lw=0,
                    color=np.where(outlier, COLORS["naive"], "#5b8db8"),
                )
            else:  # one artist instead of thousands of bars: wide layers render fast
                ax.stairs(shown, np.arange(amax.size + 1) - 0.5, fill=True, color="#5b8db8", baseline=floor)
                ax.vlines(ch[outlier], floor, shown[outlier], color=COLORS["naive"], lw=1.6)
            if log:
                ax.set_yscale("log")
                ax.set_ylim(floor, float(amax.max()) * 2)
                ax.yaxis.set_minor_formatter(NullFormatter())
                ax.set_ylabel("max |X| (log)")
            else:
                ax.set_ylim(0, float(amax.max()) * 1.25 or 1.0)
                ax.set_ylabel("max |X|")
            ax.axhline(med, color="#1b1f24", ls="--", lw=1, label=f"median {med:.3g}")
            ratio = amax[top] / med if med > 0 else math.inf
            ax.set_title(_short(name, 48), loc="left")
            ax.set_title(
                f"max ch {top}: {amax[top]:.3g} ({ratio:.3g}× median)",
                loc="right",
                fontsize=8,
                fontweight="normal",
            )
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("input channel")
            ax.set_xlim(-0.6, amax.size - 0.4)
            ax.grid(axis="x", visible=False)
            ax.legend(loc="upper left", fontsize=7)
        fig.suptitle(
            "Activation outliers: per-input-channel max |X| (highest outlier ratio first)",
            fontweight="bold",
        )
    return fig


def _hist(ax: Axes, counts: np.ndarray, rng: np.ndarray, color: str, title: str) -> None:
    counts = np.asarray(counts, dtype=float).ravel()
    lo, hi = (float(v) for v in np.asarray(rng, dtype=float).ravel()[:2])
    edges = np.linspace(lo, hi, counts.size + 1)
    ax.stairs(np.maximum(counts, 0), edges, fill=True, color=color, alpha=0.85)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set_title(title, loc="left", fontsize=9)
    ax.set_ylabel("count")
    ax.grid(axis="x", visible=False)
    if lo < 0 < hi:
        ax.axvline(0, color="#9aa3ad", lw=0.8)


def plot_histograms(data: ReportData, k: int = 3) -> Figure | None:
    """Weight and input-activation histograms (128 bins over the stored range) of the worst layers."""
    rows = []
    for name in data.worst(len(data.table)):
        w = (data.array("weight_hist", name), data.array("weight_range", name))
        a = (data.array("act_hist", name), data.array("act_range", name))
        if (w[0] is not None and w[1] is not None) or (a[0] is not None and a[1] is not None):
            rows.append((name, w, a))
        if len(rows) == k:
            break
    if not rows:
        return None
    with _style():
        fig = Figure(figsize=(WIDTH_IN, 2.3 * len(rows) + 0.4), layout="constrained")
        axes = fig.subplots(len(rows), 2, squeeze=False)
        for (name, w, a), (ax_w, ax_a) in zip(rows, axes, strict=True):
            short = _short(name, 40)
            if w[0] is not None and w[1] is not None:
                folded = " (BN-folded)" if name in data.folded else ""
                _hist(ax_w, w[0], w[1], "#5b8db8", f"{short} · weights{folded}")
            else:
                ax_w.set_visible(False)
            if a[0] is not None and a[1] is not None:
                _hist(ax_a, a[0], a[1], COLORS["naive"], f"{short} · input activations (held-out)")
            else:
                ax_a.set_visible(False)
        fig.suptitle("Weight and activation histograms of the worst layers (log count)", fontweight="bold")
    return fig


@dataclass(frozen=True)
class Plot:
    """One report figure: file stem under plots/, its section title, a caption, and its builder."""

    key: str
    title: str
    caption: str
    build: Callable[[ReportData], Figure | None]


PLOTS: tuple[Plot, ...] = (
    Plot(
        "layer_error",
        "Per-layer relative L1",
        "Markers: each layer quantized alone (isolated); lines: "
        "the whole model quantized (cumulative). Shaded: excluded layers (exclude.yaml, or FP in the policy).",
        plot_layer_error,
    ),
    Plot(
        "sqnr",
        "Per-layer SQNR",
        "Isolated signal-to-quantization-noise ratio of each layer's output.",
        plot_sqnr,
    ),
    Plot(
        "cumulative",
        "Cumulative error growth",
        "SQNR at every layer output with all layers quantized "
        "(naive) and with the policy; the gap to the isolated curve is error carried from upstream.",
        plot_cumulative,
    ),
    Plot(
        "alpha_sweep",
        "SmoothQuant α sweeps",
        "Isolated error versus α for the most sensitive layers.",
        plot_alpha_sweeps,
    ),
    Plot(
        "channel_profiles",
        "Activation outlier channels",
        "Per-input-channel max |X| over the calibration "
        "data; orange channels exceed 8× the median and force a coarse per-tensor scale.",
        plot_channel_profiles,
    ),
    Plot(
        "histograms",
        "Weight and activation histograms",
        "The layers with the largest isolated error; "
        "activation range from the fitting batches (held-out excursions pile up at the edges).",
        plot_histograms,
    ),
)


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes through the Agg canvas; no software/date metadata, so renders are reproducible."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with _style():
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def render_plots(data: ReportData) -> dict[str, bytes]:
    """Every plot that has data, as {key: PNG bytes}, in report order."""
    pngs: dict[str, bytes] = {}
    for plot in PLOTS:
        fig = plot.build(data)
        if fig is not None:
            pngs[plot.key] = figure_png(fig)
    return pngs
