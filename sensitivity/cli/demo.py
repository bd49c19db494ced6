"""`sensitivity demo`: the built-in real examples end to end; the library runs them, this prints them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from sensitivity.cli.app import app
from sensitivity.cli.console import RichProgress, out
from sensitivity.cli.options import SpecOpt
from sensitivity.cli.summary import print_summary

__all__ = ["demo"]


@app.command()
def demo(
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing report folder.")] = True,
    spec: SpecOpt = "W8A8",
    lidar: Annotated[
        bool,
        typer.Option(
            "--lidar", help="CenterPoint-shaped LiDAR model on real point clouds (needs the lidar extra)."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train (once, cached) a real model on real data, scan it, and compare FP / naive / policy results."""
    if lidar:
        _lidar(out_dir or Path("reports/demo-centerpoint"), overwrite, spec, RichProgress(not quiet))
    else:
        specs = (spec, "W4A8") if spec != "W4A8" else (spec,)
        _digits(out_dir or Path("reports/demo-digits"), overwrite, specs, RichProgress(not quiet))


def _digits(folder: Path, overwrite: bool, specs: tuple[str, ...], progress: RichProgress) -> None:
    from sensitivity.demo.run import CONFIG_LABELS, run_demo

    result = run_demo(out_dir=folder, overwrite=overwrite, specs=specs, progress=progress)
    print_summary(result.results[specs[0]], result.folders[specs[0]])
    table = Table(
        title=f"top-1 accuracy on {result.test_digits} held-out test digits (calibration: 500 other digits)"
    )
    table.add_column("model")
    for spec in specs:
        table.add_column(spec, justify="right")
        table.add_column(f"{spec} layers")
    for config, label in CONFIG_LABELS.items():
        cells = []
        for spec in specs:
            cells += [f"{100 * result.accuracy[spec][config]:.2f}%", result.layers(spec, config)]
        table.add_row(label, *cells)
    out.print(table)


def _lidar(folder: Path, overwrite: bool, spec: str, progress: RichProgress) -> None:
    from sensitivity.demo.lidar import run_lidar_demo

    result = run_lidar_demo(out_dir=folder, overwrite=overwrite, spec=spec, progress=progress)
    print_summary(result.result, None)
    table = Table(title="proxy task on held-out frames (the tile's middle third)")
    for col in ("model", "ground/non-ground acc.", "height R² (task 0)", "hm R² (task 0)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, s in result.scores.items():
        table.add_row(
            name, f"{100 * s['accuracy.0.hm']:.2f}%", f"{s['r2.0.center_z']:.4f}", f"{s['r2.0.hm']:.4f}"
        )
    out.print(table)
    out.print(f"report written to [bold]{escape(str(result.folder))}[/bold]")
