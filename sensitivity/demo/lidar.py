"""`sensitivity demo --lidar`: the CenterPoint-shaped detector on real point clouds, scanned end to end.

Nothing is printed here: the CLI shows what `run_lidar_demo` returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sensitivity.files import check_output_dir
from sensitivity.integrations import activate
from sensitivity.output import ScanResult
from sensitivity.pipeline import PhaseProgress, ScanOptions, scan
from sensitivity.quant.registry import run_context
from sensitivity.spec import QuantSpec

__all__ = ["LidarDemo", "run_lidar_demo"]


@dataclass
class LidarDemo:
    result: ScanResult
    folder: Path
    #: proxy-task scores per model ("FP", "W8A8 all layers", ...): accuracy.0.hm, r2.0.center_z, r2.0.hm
    scores: dict[str, dict[str, Any]]


def run_lidar_demo(
    out_dir: Path,
    overwrite: bool = True,
    spec: str = "W8A8",
    progress: PhaseProgress | None = None,
    batches: int = 8,
) -> LidarDemo:
    """Train or load the model, scan it on `batches` real frames, write the report, return the scores."""
    from sensitivity.demo.centerpoint_train import evaluate_proxy, lidar_batches, train_centerpoint

    progress = progress or PhaseProgress()
    check_output_dir(out_dir, overwrite)  # before training: a folder the demo may not replace is refused now
    t0 = time.perf_counter()
    model = activate(train_centerpoint())
    progress.note(
        f"CenterPoint-shaped model ready ({time.perf_counter() - t0:.1f} s; cached after the first run; "
        "3D backbone and vel heads untrained, see model.training_meta)"
    )
    data = lidar_batches(batches)
    options = ScanOptions(spec=QuantSpec.parse(spec), outputs=("pred_dicts",))
    result = ScanResult.of(scan(model, data, options, model_name="demo-centerpoint", progress=progress))
    folder = result.save(out_dir, overwrite=overwrite)
    with run_context(model):  # spconv on CPU: one thread, as in the scan
        scores: dict[str, dict[str, Any]] = {"FP": evaluate_proxy(model)}
        for config, label in (("naive", "all layers"), ("exclusion", "+ exclusions"), ("policy", "policy")):
            scores[f"{result.spec.name} {label}"] = evaluate_proxy(result.quantized_model(config))
    return LidarDemo(result, folder, scores)
