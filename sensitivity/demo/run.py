"""`sensitivity demo`: a real trained CNN on real digits, scanned end to end, accuracies measured.

The digits CNN is trained once on CPU (cached), calibrated on 500 digits kept apart from training and
scored on 1,000 test digits it never saw: the research notes' table (FP vs naive vs naive+exclusion vs
the toolkit's policy, with an exclusion budget of half a point of top-1), for W8A8 and W4A8, measured by
the scan's own `--eval` machinery. Nothing is printed here: the CLI shows what `run_demo` returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sensitivity.demo.digits import accuracy, calibration_batches, data_source, load_split, train_digits_cnn
from sensitivity.files import check_output_dir
from sensitivity.output import ScanResult
from sensitivity.pipeline import PhaseProgress, ScanOptions, scan
from sensitivity.spec import QuantSpec

__all__ = ["CONFIG_LABELS", "DEMO_SPECS", "DigitsDemo", "run_demo"]

DEMO_SPECS = ("W8A8", "W4A8")
#: the policy may give up at most half a point of top-1 against FP: beyond it, the scan's greedy
#: exclusion budget keeps the next most sensitive layer in FP (one evaluation per step)
ACCURACY_BUDGET = 0.005
CONFIG_LABELS = {
    "fp": "FP",
    "naive": "naive",
    "naive+exclusion": "naive + exclusion",
    "policy": "policy (sensitivity)",
}


@dataclass
class DigitsDemo:
    """Per spec: the scan, where its report went, and top-1 per configuration (FP, naive, ...)."""

    results: dict[str, ScanResult] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)
    test_digits: int = 0

    def layers(self, spec: str, config: str) -> str:
        """How many layers `config` quantizes, smooths and keeps in FP, in words."""
        row = self.results[spec].comparison.set_index("config").loc[config]
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
) -> DigitsDemo:
    """Train or load the digits CNN, scan it per spec (reports under `out_dir`, `out_dir`-w4a8, ...)."""
    progress = progress or PhaseProgress()
    folders = [out_dir, *(out_dir.with_name(f"{out_dir.name}-{spec.lower()}") for spec in specs[1:])]
    for folder in folders:  # before training: a folder the demo may not replace is refused now
        check_output_dir(folder, overwrite)
    t0 = time.perf_counter()
    model = train_digits_cnn()
    progress.note(
        f"digits CNN ready ({data_source()}, {time.perf_counter() - t0:.1f} s; cached after the first run)"
    )
    split = load_split()
    batches = list(calibration_batches(64, split))
    images, labels = split.test

    def top1(m: nn.Module) -> dict[str, float]:
        return {"top1": accuracy(m, images, labels)}

    demo = DigitsDemo(test_digits=len(labels))
    for spec, folder in zip(specs, folders, strict=True):
        options = ScanOptions(spec=QuantSpec.parse(spec), exclude_budget=ACCURACY_BUDGET)
        data = scan(
            model,
            batches,
            options,
            model_name=f"demo-digits-{spec.lower()}",
            progress=progress,
            evaluate=top1,
        )
        result = ScanResult.of(data)
        demo.folders[spec] = result.save(folder, overwrite=overwrite)
        demo.results[spec] = result
        comp = result.comparison.set_index("config")
        demo.accuracy[spec] = {c: float(comp.loc[c, "eval_top1"]) for c in CONFIG_LABELS}
    return demo
