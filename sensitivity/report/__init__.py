"""The HTML report: reads a scan folder's files (layers.csv, scan.json, stats.npz, YAMLs) and renders
report.html and plots/*.png. Never imports torch, quant/ or capture/, so a report re-renders anywhere.
The individual plots live in `sensitivity.report.plots`."""

from sensitivity.report.data import ReportData, ReportDataError, load_report_data
from sensitivity.report.plots import PLOTS, render_plots
from sensitivity.report.render import render_html, render_report

__all__ = [
    "PLOTS",
    "ReportData",
    "ReportDataError",
    "load_report_data",
    "render_html",
    "render_plots",
    "render_report",
]
