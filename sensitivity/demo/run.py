"""`sensitivity demo`: a real trained CNN on real digits, scanned end to end, accuracies measured.

The digits CNN is trained once on CPU (cached), calibrated on 500 digits kept apart from training and
scored on 1,000 test digits it never saw: the research notes' table (FP vs naive vs naive+exclusion vs
the toolkit's policy, with an exclusion budget of half a point of top-1), for W8A8 and W4A8, measured by
the scan's own `--eval` machinery.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from torch import nn

from sensitivity.demo.digits import accuracy, calibration_batches, data_source, load_split, train_digits_cnn
from sensitivity.files import check_output_dir
from sensitivity.quant.spec import QuantSpec
from sensitivity.scan import PhaseProgress, ScanOptions, ScanResult, scan

__all__ = ["DEMO_SPECS", "run_demo"]

DEMO_SPECS = ("W8A8", "W4A8")
#: the policy may give up at most half a point of top-1 against FP: beyond it, the scan's greedy
#: exclusion budget keeps the next most sensitive layer in FP (one evaluation per step)
ACCURACY_BUDGET = 0.005
_LABELS = {
    "fp": "FP",
    "naive": "naive",
    "naive+exclusion": "naive + exclusion",
    "policy": "policy (sensitivity)",
}


def _layers(result: ScanResult, config: str) -> str:
    row = result.comparison.set_index("config").loc[config]
    parts = [f"{int(row['quantized_layers'])} quantized"]
    if config == "policy" and row["smoothquant_layers"]:
        parts.append(f"{int(row['smoothquant_layers'])} SmoothQuant")
    if row["fp_layers"] and config != "fp":
        parts.append(f"{int(row['fp_layers'])} FP")
    return ", ".join(parts)


def run_demo(
    out_dir: Path,
    overwrite: bool = True,
    specs: tuple[str, ...] = DEMO_SPECS,
    progress: PhaseProgress | None = None,
    console: Console | None = None,
) -> dict[str, dict[str, float]]:
    """Train or load the digits CNN, scan it per spec (reports under `out_dir`, `out_dir`-w4a8, ...),
    print and return top-1 accuracy per spec and configuration."""
    console = console or Console()
    folders = [out_dir, *(out_dir.with_name(f"{out_dir.name}-{spec.lower()}") for spec in specs[1:])]
    for folder in folders:  # before training: a folder the demo may not replace is refused now
        check_output_dir(folder, overwrite)
    t0 = time.perf_counter()
    model = train_digits_cnn()
    console.print(
        f"digits CNN ready ({data_source()}, {time.perf_counter() - t0:.1f} s; cached after the first run)"
    )
    split = load_split()
    batches = list(calibration_batches(64, split))
    images, labels = split.test

    def top1(m: nn.Module) -> dict[str, float]:
        return {"top1": accuracy(m, images, labels)}

    results: dict[str, ScanResult] = {}
    for i, (spec, folder) in enumerate(zip(specs, folders, strict=True)):
        result = scan(
            model, batches, ScanOptions(spec=QuantSpec.parse(spec), exclude_budget=ACCURACY_BUDGET),
            model_name=f"demo-digits-{spec.lower()}",
            progress=progress, evaluate=top1,
        )  # fmt: skip
        result.save(str(folder), overwrite=overwrite)
        results[spec] = result
        if i == 0:
            from sensitivity.cli import print_summary

            print_summary(result, folder)
    table = Table(
        title=f"top-1 accuracy on {len(labels)} held-out test digits (calibration: 500 other digits)"
    )
    table.add_column("model")
    for spec in specs:
        table.add_column(spec, justify="right")
        table.add_column(f"{spec} layers")
    accs: dict[str, dict[str, float]] = {}
    for config, label in _LABELS.items():
        cells = []
        for spec in specs:
            comp = results[spec].comparison.set_index("config")
            acc = float(comp.loc[config, "eval_top1"])
            accs.setdefault(spec, {})[config] = acc
            cells += [f"{100 * acc:.2f}%", _layers(results[spec], config)]
        table.add_row(label, *cells)
    console.print(table)
    return accs
