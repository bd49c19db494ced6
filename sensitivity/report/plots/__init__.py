"""The report's figures, drawn from a `ReportData` with matplotlib's object API and the Agg canvas.

No pyplot: figures never touch the global backend, so the same functions render PNGs for report.html and
show inline in a notebook. Each function returns a `Figure`, or None when its data is absent (e.g. no
alpha sweeps in a scan run without SmoothQuant), and the report leaves that plot out.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sensitivity.report.data import ReportData
from sensitivity.report.plots.layers import plot_cumulative, plot_layer_error, plot_sqnr
from sensitivity.report.plots.outputs import plot_fp_curve, plot_output_error, plot_predicted_vs_measured
from sensitivity.report.plots.smoothquant import plot_alpha_sweeps, plot_channel_profiles, plot_histograms
from sensitivity.report.plots.style import style
from sensitivity.report.plots.workers import render_in_workers

__all__ = [
    "PLOTS",
    "Plot",
    "figure_png",
    "plot_alpha_sweeps",
    "plot_channel_profiles",
    "plot_cumulative",
    "plot_fp_curve",
    "plot_histograms",
    "plot_layer_error",
    "plot_output_error",
    "plot_predicted_vs_measured",
    "plot_sqnr",
    "render_plots",
]


@dataclass(frozen=True)
class Plot:
    """One report figure: file stem under plots/, its section title, a caption, its builder, and its
    rendering cost relative to the others (seconds measured on a 53-layer scan, to share the figures
    out between worker processes evenly)."""

    key: str
    title: str
    caption: str
    build: Callable[[ReportData], Figure | None]
    cost: float = 0.25


PLOTS: tuple[Plot, ...] = (
    Plot(
        "output_error",
        "Each layer's cost at the model's outputs",
        "Relative output MSE (Σ over outputs of ‖Δy‖² / ‖y‖², held-out batches) with only that layer "
        "quantized: naive, with its best candidate (calibrator range or SmoothQuant), and measured exactly "
        "where the scan checked it. Predicted by output probes (first order) unless measured.",
        plot_output_error,
        0.4,
    ),
    Plot(
        "fp_curve",
        "Output error vs layers kept in FP",
        "Every layer naive, then the FP layers added in rank order: the predicted sum of the remaining "
        "layers' errors, and the whole quantized model measured where the scan ran it; the star is the "
        "policy (the same FP layers, its chosen method on each other layer).",
        plot_fp_curve,
    ),
    Plot(
        "predicted_vs_measured",
        "Predicted vs measured output error",
        "Layers the scan measured exactly (the budget's edge): the first-order prediction against the "
        "layer quantized alone over the held-out batches.",
        plot_predicted_vs_measured,
    ),
    Plot(
        "layer_error",
        "Per-layer relative L1",
        "Markers: each layer quantized alone (isolated); lines: "
        "the whole model quantized (cumulative). Shaded: excluded layers (exclude.yaml, or FP in the policy).",
        plot_layer_error,
        0.35,
    ),
    Plot(
        "sqnr",
        "Per-layer SQNR",
        "Isolated signal-to-quantization-noise ratio of each layer's output.",
        plot_sqnr,
        0.5,
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
        0.7,
    ),
    Plot(
        "channel_profiles",
        "Activation outlier channels",
        "Per-input-channel max |X| over the calibration "
        "data; orange channels exceed 8× the median and force a coarse per-tensor scale.",
        plot_channel_profiles,
        1.0,
    ),
    Plot(
        "histograms",
        "Weight and activation histograms",
        "The layers with the largest isolated error; "
        "activation range from the fitting batches (held-out excursions pile up at the edges).",
        plot_histograms,
        0.9,
    ),
)


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes through the Agg canvas; no software/date metadata, so renders are reproducible."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    with style():
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def render_plots(data: ReportData, workers: int | None = None) -> dict[str, bytes]:
    """Every plot that has data, as {key: PNG bytes}, in report order. Drawn by `workers` processes (the
    parent and forked children; default: one per usable CPU, at most 4): the same bytes either way."""

    def draw(i: int) -> bytes | None:
        fig = PLOTS[i].build(data)
        return figure_png(fig) if fig is not None else None

    pngs = render_in_workers(len(PLOTS), draw, [p.cost for p in PLOTS], workers)
    return {plot.key: png for plot, png in zip(PLOTS, pngs, strict=True) if png is not None}
