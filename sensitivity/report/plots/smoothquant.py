"""SmoothQuant's figures: the alpha sweeps, the per-channel outlier profiles, and the weight / activation
histograms of the worst layers."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from sensitivity.report.data import ReportData
from sensitivity.report.plots.style import (
    COLORS,
    WIDTH_IN,
    clip_log,
    grid,
    log_limits,
    no_minor_ticks,
    short_name,
    style,
    values,
)

__all__ = ["plot_alpha_sweeps", "plot_channel_profiles", "plot_histograms"]

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
    naive_all = values(data, "iso", "naive", "rel_l1")
    with style():
        fig, axes = grid(len(layers), min(len(layers), 2), 2.8)
        for ax, name in zip(axes, layers, strict=True):
            sweeps = [(s, _sweep(data, s[0], name)) for s in SWEEPS]
            sweeps = [(s, sw) for s, sw in sweeps if sw is not None]
            naive = naive_all[data.names.index(name)]
            lo, hi = log_limits(ax, [sw[:, 1] for _, sw in sweeps] + [np.array([naive])])
            for (_, method, label), sw in sweeps:
                alpha, rel = sw[:, 0], sw[:, 1]
                ax.plot(
                    alpha, clip_log(rel, lo, hi), color=COLORS[method], marker="o", ms=4, lw=1.8, label=label
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
            ax.set_title(short_name(name, 48), loc="left")
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
    with style():
        fig, axes = grid(len(layers), min(len(layers), 2), 2.7)
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
                no_minor_ticks(ax.yaxis)
                ax.set_ylabel("max |X| (log)")
            else:
                ax.set_ylim(0, float(amax.max()) * 1.25 or 1.0)
                ax.set_ylabel("max |X|")
            ax.axhline(med, color="#1b1f24", ls="--", lw=1, label=f"median {med:.3g}")
            ratio = amax[top] / med if med > 0 else math.inf
            ax.set_title(short_name(name, 48), loc="left")
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
    no_minor_ticks(ax.yaxis)
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
    with style():
        fig = Figure(figsize=(WIDTH_IN, 2.3 * len(rows) + 0.4), layout="constrained")
        axes = fig.subplots(len(rows), 2, squeeze=False)
        for (name, w, a), (ax_w, ax_a) in zip(rows, axes, strict=True):
            short = short_name(name, 40)
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
