"""Scan cost on edge-model shapes (MobileNetV2, EfficientNet-Lite0 x2 paddings, YOLOv8n) and ResNet-50.

Why: the README's targets (scan <= 4x an FP forward in time, <= 2x in peak memory) were measured on
ResNets only; edge models are deeper in cheap layers (depthwise convs, 1x1s), where the scan's per-layer
overhead weighs more. Per model, in one run (random weights, random images):
  in-process:    `sensitivity.scan(model, batches)` (default options, no report written) vs a plain FP
                 forward over the same batches, interleaved FP, scan, FP, scan, ...; medians, and each
                 ratio the median of the rounds' ratios.
  whole process: `python -m sensitivity scan` on a saved state dict with `--arch benchmarks.<module>:<fn>`
                 (report written) vs benchmarks/fp_forward.py (load model and data, one FP pass), through
                 harness.py: alternated after a warm-up round, medians; wall time and peak RSS ratios
                 (launched from a fresh light process, so no child inherits this process's peak RSS).
  --one-at-a-time: one run of benchmarks/one_at_a_time.py on the whole-process data, divided by the scan.
  --stored-mb 128,512: the scan at each `--stored-mb` (MiB of layer outputs a held-out piece stores; the
                 first is the default's), side by side in the same interleaving: memory traded for time.
  dense floor:   one more in-process scan with its convolutions and matrix products timed (dense_floor.py):
                 their seconds alone against the FP forward, the floor under the in-process ratio.
Also printed: the target layers the scan found vs the Conv/Linear modules present (subclasses included).

Usage: .venv/bin/python benchmarks/edge_speed.py [--models mobilenet_v2,yolov8n] [--repeats 3]
           [--images 32] [--process-images 16] [--no-process] [--no-inprocess] [--one-at-a-time]
           [--stored-mb 128,512]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import edge_models  # noqa: E402
from dense_floor import DenseFloor, dense_floor  # noqa: E402
from harness import Measured, compare_isolated  # noqa: E402
from resnets import resnet50  # noqa: E402

from sensitivity import ScanOptions  # noqa: E402

# name -> (factory, `--arch` spec resolved from the repo root, image side)
MODELS: dict[str, tuple[Callable[[], nn.Module], str, int]] = {
    "mobilenet_v2": (edge_models.mobilenet_v2, "benchmarks.edge_models:mobilenet_v2", 224),
    "efficientnet_lite0_plain": (
        edge_models.efficientnet_lite0_plain,
        "benchmarks.edge_models:efficientnet_lite0_plain",
        224,
    ),
    "efficientnet_lite0": (edge_models.efficientnet_lite0, "benchmarks.edge_models:efficientnet_lite0", 224),
    "yolov8n": (edge_models.yolov8n, "benchmarks.edge_models:yolov8n", 320),
    "resnet50": (resnet50, "benchmarks.resnets:resnet50", 224),
}


@dataclass
class Row:
    """What one model measured; NaN / empty where a part was not run or failed."""

    name: str
    present: int
    found: int = -1  # target layers of the in-process scan
    found_cli: int = -1  # rows of the CLI scan's layers.csv
    decisions: str = ""
    #: in-process, per `--stored-mb` value: wall and CPU seconds (no RSS)
    scans: dict[float, Measured] = field(default_factory=dict)
    fp: Measured = field(default_factory=Measured)
    #: whole processes: "scan@128", ..., "fp-forward", "one-at-a-time"
    proc: dict[str, Measured] = field(default_factory=dict)
    #: the default scan's dense-layer compute (in process, default --stored-mb)
    floor: DenseFloor | None = None
    errors: list[str] = field(default_factory=list)


def _med(values: list[float]) -> float:
    """Median that tolerates a part that was not run (NaN)."""
    return statistics.median(values) if values else float("nan")


def _ratio(a: Measured | None, b: Measured | None, what: str) -> tuple[float, float, float]:
    """(a / b, a, b) for `what` ("wall_s", "cpu_s", "peak_rss_mb"): the ratio is the median of the rounds'
    ratios (each run of `a` against the run of `b` in its round: this shared machine's speed drifts by a
    third between rounds, which a ratio of medians mixes in), a and b the medians; NaN where missing."""
    xs = getattr(a, what) if a is not None else []
    ys = getattr(b, what) if b is not None else []
    x, y = _med(xs), _med(ys)
    pairs = [u / v for u, v in zip(xs, ys, strict=False) if v]
    return (_med(pairs) if len(xs) == len(ys) and pairs else x / y if y else float("nan")), x, y


def image_batches(images: int, batch_size: int, side: int, seed: int = 0) -> list[torch.Tensor]:
    """Seeded random images: timing needs shapes, not content."""
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(images, 3, side, side, generator=g).split(batch_size))


def in_process(
    row: Row, model: nn.Module, batches: list[torch.Tensor], repeats: int, stored: list[float]
) -> None:
    """FP forward and the scan at each `stored` MiB, interleaved (FP, scan, scan', FP, scan, scan', ...),
    after one FP warm-up batch; otherwise default options."""
    from sensitivity import scan

    with torch.no_grad():
        model(batches[0])
    results: dict[float, Any] = {}  # the latest scan per budget
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            for b in batches:
                model(b)
        row.fp.wall_s.append(time.perf_counter() - t0)
        row.fp.cpu_s.append(time.process_time() - c0)
        for mb in stored:
            got = row.scans.setdefault(mb, Measured())
            t0, c0 = time.perf_counter(), time.process_time()
            result = results[mb] = scan(model, batches, ScanOptions(stored_activation_mb=mb))
            got.wall_s.append(time.perf_counter() - t0)
            got.cpu_s.append(time.process_time() - c0)
            phases = " ".join(
                f"{k.removesuffix('_s')} {v:.1f}" for k, v in result.timings.items() if k != "total_s"
            )
            print(
                f"  in-process {r + 1}: FP {row.fp.wall_s[-1]:6.2f} s (cpu {row.fp.cpu_s[-1]:6.2f})  "
                f"scan@{mb:g} {got.wall_s[-1]:6.2f} s (cpu {got.cpu_s[-1]:6.2f}; {phases})",
                file=sys.stderr,
            )
    result = results[stored[0]]
    row.found = len(result.layers)
    counts = result.table["decision"].value_counts().to_dict()
    row.decisions = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    if result.first_nonfinite:
        row.errors.append(f"naive first non-finite at {result.first_nonfinite}")
    row.floor = dense_floor(model, batches, ScanOptions(stored_activation_mb=stored[0]), warm=True)


def whole_process(row: Row, model: nn.Module, arch: str, side: int, args: argparse.Namespace) -> None:
    """CLI scan vs fp_forward.py (and optionally one_at_a_time.py) on a saved state dict and data file."""
    with tempfile.TemporaryDirectory(prefix="edge_speed_") as tmp:
        tmpd = Path(tmp)
        torch.save(model.state_dict(), tmpd / "model.pth")
        torch.save(
            torch.cat(image_batches(args.process_images, args.batch_size, side, seed=1)), tmpd / "calib.pt"
        )
        py, bs = sys.executable, str(args.batch_size)
        common = [str(tmpd / "model.pth"), arch, str(tmpd / "calib.pt"), bs]
        commands = {
            f"scan@{mb:g}": [py, "-m", "sensitivity", "scan", str(tmpd / "model.pth"), "--arch", arch, "--calib",
                             str(tmpd / "calib.pt"), "--batch-size", bs, "--out", str(tmpd / f"report{i}"),
                             "--overwrite", "--quiet", "--stored-mb", f"{mb:g}"]
            for i, mb in enumerate(args.stored)
        }  # fmt: skip
        commands["fp-forward"] = [py, str(HERE / "fp_forward.py"), *common]
        res = compare_isolated(commands, repeats=args.repeats, warmup=args.warmup)
        row.proc = dict(res)
        layers_csv = tmpd / "report0" / "layers.csv"
        if layers_csv.is_file():  # the CLI's own layer count (one line per target layer)
            with layers_csv.open(newline="") as fh:
                row.found_cli = sum(1 for _ in csv.reader(fh)) - 1
        if args.one_at_a_time:
            base = [py, str(HERE / "one_at_a_time.py"), *common]
            row.proc.update(compare_isolated({"one-at-a-time": base}, repeats=1, warmup=0))


def measure(name: str, args: argparse.Namespace) -> Row:
    """All parts for one model; a failing part is recorded in the row, not raised."""
    factory, arch, side = MODELS[name]
    torch.manual_seed(0)
    model = factory()
    row = Row(name, present=edge_models.count_targets(model))
    print(f"{name}: {row.present} Conv/Linear modules, images {side}x{side}", file=sys.stderr)
    batches = image_batches(args.images, args.batch_size, side)
    parts: list[tuple[str, Callable[[], None]]] = []
    if not args.no_inprocess:
        parts.append(("in-process", lambda: in_process(row, model, batches, args.repeats, args.stored)))
    if not args.no_process:
        parts.append(("whole-process", lambda: whole_process(row, model, arch, side, args)))
    for label, part in parts:
        try:
            part()
        except Exception as exc:  # report and go on with the next part / model
            row.errors.append(f"{label} failed: {type(exc).__name__}: {str(exc).strip()[-600:]}")
            print(f"  {row.errors[-1]}", file=sys.stderr)
    return row


def report(rows: list[Row], args: argparse.Namespace) -> None:
    """The ratio table: wall time, CPU time (steadier on a shared machine) and peak RSS, scan / FP forward."""
    print(
        f"\nedge_speed: in-process {args.images} images, whole-process {args.process_images} images "
        f"(224x224, 320x320 for yolov8n), batch {args.batch_size}, torch threads {torch.get_num_threads()}, "
        f"medians of {args.repeats}, load average at end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print("scan / FP forward ratios (scan s / FP s); CPU = user + system seconds of the process")
    print(f"{'model':<25} {'layers':>9}  {'in-process wall':<22} {'in-process CPU':<22} "
          f"{'process wall':<22} {'process CPU':<22} {'process peak RSS':<22}")  # fmt: skip
    for r in rows:
        fp = r.proc.get("fp-forward")
        found = max(r.found, r.found_cli)
        for mb in args.stored:
            proc = r.proc.get(f"scan@{mb:g}")
            cells = [
                _ratio(r.scans.get(mb), r.fp, "wall_s"),
                _ratio(r.scans.get(mb), r.fp, "cpu_s"),
                _ratio(proc, fp, "wall_s"),
                _ratio(proc, fp, "cpu_s"),
                _ratio(proc, fp, "peak_rss_mb"),
            ]
            name = r.name if len(args.stored) == 1 else f"{r.name} @{mb:g} MiB"
            line = f"{name:<25} {found if found >= 0 else '?':>4}/{r.present:<4} "
            print(line + " ".join(f"{q:6.2f}x ({a:6.1f}/{b:6.1f})" for q, a, b in cells))
        if "one-at-a-time" in r.proc:
            scan0 = r.proc.get(f"scan@{args.stored[0]:g}")
            wall = _ratio(r.proc["one-at-a-time"], scan0, "wall_s")
            cpu = _ratio(r.proc["one-at-a-time"], scan0, "cpu_s")
            print(f"{'':<27}one-at-a-time / scan (whole process): wall {wall[0]:.1f}x ({wall[1]:.1f} s), "
                  f"CPU {cpu[0]:.1f}x ({cpu[1]:.1f} s)")  # fmt: skip
        if r.floor is not None:
            print(f"{'':<27}{r.floor.line()}")
        if r.decisions:
            print(f"{'':<27}decisions: {r.decisions}")
        if min(r.found, r.found_cli) >= 0 and r.found != r.found_cli:
            r.errors.append(f"in-process scan found {r.found} layers, the CLI {r.found_cli}")
        for err in r.errors:
            print(f"{'':<27}! {err}")


def main() -> None:
    """Parse options, measure each model in turn, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models", default="mobilenet_v2,efficientnet_lite0_plain,efficientnet_lite0,yolov8n,resnet50"
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="whole-process warm-up rounds (not counted)")
    ap.add_argument("--images", type=int, default=32, help="in-process images")
    ap.add_argument("--process-images", type=int, default=16, help="whole-process images")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-inprocess", action="store_true")
    ap.add_argument("--no-process", action="store_true")
    ap.add_argument("--one-at-a-time", action="store_true", help="one run of the one-at-a-time baseline")
    ap.add_argument(
        "--stored-mb", default=f"{ScanOptions().stored_activation_mb:g}",
        help="comma-separated scan --stored-mb values, side by side (default: the scan's default)",
    )  # fmt: skip
    args = ap.parse_args()
    try:
        args.stored = [float(v) for v in args.stored_mb.split(",")]
    except ValueError:
        ap.error(f"--stored-mb takes comma-separated numbers, got {args.stored_mb!r}")
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # the `--arch benchmarks.<module>:<fn>` specs resolve from the repo root
    rows = [measure(name, args) for name in args.models.split(",")]
    report(rows, args)


if __name__ == "__main__":
    main()
