"""`sensitivity demo`: a real trained CNN on real digits, scanned end to end, with accuracies measured.

The digits CNN is trained once on CPU (cached), calibrated on 500 held-apart digits and scored on 1,000
test digits it never saw: FP vs all-layers W8A8 vs W8A8 with the scan's exclusions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sensitivity.demo.digits import accuracy, calibration_batches, data_source, load_split, train_digits_cnn
from sensitivity.quant.spec import QuantSpec
from sensitivity.scan import PhaseProgress, ScanOptions, scan

__all__ = ["run_demo"]


def run_demo(
    out_dir: Path,
    overwrite: bool = True,
    spec: str = "W8A8",
    progress: PhaseProgress | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train or load the digits CNN, scan it, write the report, and return the accuracy table."""
    console = console or Console()
    t0 = time.perf_counter()
    model = train_digits_cnn()
    console.print(
        f"digits CNN ready ({data_source()}, {time.perf_counter() - t0:.1f} s; cached after the first run)"
    )
    split = load_split()
    batches = list(calibration_batches(64, split))
    result = scan(
        model, batches, ScanOptions(spec=QuantSpec.parse(spec)), model_name="demo-digits", progress=progress
    )
    written = result.save(str(out_dir), overwrite=overwrite)
    from sensitivity.cli import print_summary

    print_summary(result, None)
    images, labels = split.test
    name = result.spec.name
    n_sq = int((result.table["decision"] == "smoothquant").sum())
    n_fp = int((result.table["decision"] == "fp").sum())
    rows = {
        "FP": accuracy(model, images, labels),
        f"{name} naive, all layers": accuracy(result.quantized_model("naive"), images, labels),
        f"{name} naive + exclusion ({len(result.excluded)} FP)": accuracy(
            result.quantized_model("exclusion"), images, labels
        ),
        f"{name} policy ({n_sq} SmoothQuant, {n_fp} FP)": accuracy(
            result.quantized_model("policy"), images, labels
        ),
    }
    table = Table(title=f"top-1 accuracy on {len(labels)} held-out test digits")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    for name, acc in rows.items():
        table.add_row(name, f"{100 * acc:.2f}%")
    console.print(table)
    console.print(f"report written to [bold]{written}[/bold]")
    return rows
