"""`sensitivity demo --lidar`: the CenterPoint-shaped detector on a real LiDAR scan, scanned end to end.

The model's 2D backbone and heads are trained once on CPU (cached, about 35 s), calibrated on real
voxelized frames of the aerial tile and scored on held-out frames it never saw: the proxy-task quality
(ground / non-ground cell accuracy, R² of the mean height) for FP, all layers W8A8, W8A8 with the
scan's exclusions, and the scan's per-layer policy. Needs the ``lidar`` extra (spconv).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from sensitivity.files import check_output_dir
from sensitivity.scan import PhaseProgress, ScanOptions, scan

__all__ = ["run_lidar_demo"]


def run_lidar_demo(
    out_dir: Path,
    overwrite: bool = True,
    spec: str = "W8A8",
    progress: PhaseProgress | None = None,
    console: Console | None = None,
    batches: int = 8,
) -> dict[str, dict[str, float]]:
    """Train or load the model, scan it on `batches` real frames, write the report, return the scores."""
    from sensitivity.demo.centerpoint import evaluate_proxy, lidar_batches, train_centerpoint
    from sensitivity.integrations.spconv import single_thread_if_sparse
    from sensitivity.quant.spec import QuantSpec

    console = console or Console()
    check_output_dir(out_dir, overwrite)  # before training: a folder the demo may not replace is refused now
    t0 = time.perf_counter()
    model = train_centerpoint()
    console.print(
        f"CenterPoint-shaped model ready ({time.perf_counter() - t0:.1f} s; cached after the first run; "
        "3D backbone and vel heads untrained, see model.training_meta)"
    )
    data = lidar_batches(batches)
    options = ScanOptions(spec=QuantSpec.parse(spec), outputs=("pred_dicts",))
    with single_thread_if_sparse(model):
        result = scan(model, data, options, model_name="demo-centerpoint", progress=progress)
        written = result.save(str(out_dir), overwrite=overwrite)
        from sensitivity.cli import print_summary

        print_summary(result, None)
        rows: dict[str, dict[str, Any]] = {"FP": evaluate_proxy(model)}
        for config, label in (("naive", "all layers"), ("exclusion", "+ exclusions"), ("policy", "policy")):
            rows[f"{result.spec.name} {label}"] = evaluate_proxy(result.quantized_model(config))
    table = Table(title="proxy task on held-out frames (the tile's middle third)")
    for col in ("model", "ground/non-ground acc.", "height R² (task 0)", "hm R² (task 0)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, s in rows.items():
        table.add_row(
            name, f"{100 * s['accuracy.0.hm']:.2f}%", f"{s['r2.0.center_z']:.4f}", f"{s['r2.0.hm']:.4f}"
        )
    console.print(table)
    console.print(f"report written to [bold]{written}[/bold]")
    return rows
