"""The default SmoothQuant alpha grid, cost against benefit: policy v2 with no SmoothQuant, the default single
alpha (0.5) and a 3-alpha grid (0.25, 0.5, 0.75), on the real trained models of `output_models.py`.

Per model and grid, in one run: the default v2 scan's wall time (ratio to the scan without SmoothQuant),
how many layers the verified policy puts on SmoothQuant, and the policy's relative output MSE (and task
metric) on test batches neither calibration nor the policy saw. A grid is worth its cost only where its
policy measures a lower test output error than the single alpha's.

    .venv/bin/python benchmarks/alpha_grid.py [--models digits,mobilenet,yolo] [--threads 2]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from output_models import MODELS, Case
from output_sensitivity import measure_on_test

from sensitivity import ScanOptions, scan
from sensitivity.quant.registry import run_context

GRIDS: dict[str, tuple[float, ...]] = {
    "none": (),
    "0.5 (default)": (0.5,),
    "0.25,0.5,0.75": (0.25, 0.5, 0.75),
}


def run_case(case: Case) -> list[tuple[str, float, int, float, float]]:
    rows = []
    with run_context(case.model):
        scan(case.model, case.calib[:2], ScanOptions(**{**case.options, "probes": 0}))  # warm-up, untimed
        for label, alphas in GRIDS.items():
            t = time.perf_counter()
            result = scan(case.model, case.calib, ScanOptions(**{**case.options, "alphas": alphas}))
            seconds = time.perf_counter() - t
            sq = sum(1 for d in result.table["decision"] if d == "smoothquant")
            configs = result.layer_configs("policy")
            err, metric = measure_on_test(result, configs, case, result.options.output_selector)
            rows.append((label, seconds, sq, err, metric))
    return rows


def report(name: str, metric_name: str, rows: list[tuple[str, float, int, float, float]]) -> None:
    base = rows[0][1]
    print(f"\n## {name}")
    print(
        f"| alpha grid | scan time | SmoothQuant layers | test rel. output MSE | {metric_name or 'task metric'} |"
    )
    print("|---|---|---|---|---|")
    for label, seconds, sq, err, metric in rows:
        shown = f"{metric:.4f}" if math.isfinite(metric) else "—"
        print(f"| {label} | {seconds:.1f} s ({seconds / base:.2f}x) | {sq} | {err:.4g} | {shown} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        case = MODELS[name]()
        report(case.name, case.metric_name, run_case(case))


if __name__ == "__main__":
    main()
