"""`sensitivity report` re-renders a report folder; `sensitivity view` opens it (or serves it on loopback)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sensitivity.cli.app import app
from sensitivity.cli.console import out

__all__ = ["report", "view"]


ReportDirArg = Annotated[
    Path, typer.Argument(help="A report folder written by scan (layers.csv, scan.json, stats.npz).")
]


@app.command()
def report(report_dir: ReportDirArg) -> None:
    """Re-render report.html and plots/ from a report folder's files (no model needed)."""
    from sensitivity.report import render_report

    written = render_report(report_dir)
    out.print(f"report written to [bold]{written}[/bold]")


@app.command()
def view(
    report_dir: ReportDirArg,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Do not open a browser: serve the folder on 127.0.0.1.")
    ] = False,
    port: Annotated[int, typer.Option("--port", help="Port to serve on (0: a free one).")] = 0,
) -> None:
    """Open report.html in a browser; where none can open (headless), serve it on 127.0.0.1."""
    from sensitivity.report import render_report
    from sensitivity.report.serve import make_server, open_in_browser

    html = report_dir / "report.html"
    if not html.is_file():
        html = render_report(report_dir)
    if not no_browser and open_in_browser(html):
        out.print(f"opened [bold]{html}[/bold] in the browser")
        return
    server = make_server(report_dir, port=port)
    out.print(f"serving {report_dir} at [bold]{server.url}[/bold]  (Ctrl-C to stop)", soft_wrap=True)
    try:  # Ctrl-C / SIGTERM end it through the entry point: "interrupted: stopped serving", exit 130 / 143
        server.serve_forever()
    finally:
        server.server_close()
