"""The HTML report: reads a scan folder's files (layers.csv, scan.json, stats.npz, YAMLs) and renders
report.html and plots/*.png. Never imports torch, quant/ or capture/, so a report re-renders anywhere."""

from sensitivity.report.data import ReportData, ReportDataError, load_report_data
from sensitivity.report.plots import (
    PLOTS,
    figure_png,
    plot_alpha_sweeps,
    plot_channel_profiles,
    plot_cumulative,
    plot_histograms,
    plot_layer_error,
    plot_sqnr,
    render_plots,
)
from sensitivity.report.render import render_html, render_report

__all__ = [
    "PLOTS",
    "ReportData",
    "ReportDataError",
    "figure_png",
    "load_report_data",
    "plot_alpha_sweeps",
    "plot_channel_profiles",
    "plot_cumulative",
    "plot_histograms",
    "plot_layer_error",
    "plot_sqnr",
    "render_html",
    "render_plots",
    "render_report",
]
