"""Scan cost against a plain FP forward and against the one-at-a-time baseline, as whole processes.

Builds a ResNet-18- or ResNet-50-shaped model (random weights, realistic BN statistics) and random
3x224x224 images, saves them like a user would, then runs alternately (medians of --repeats runs):
  scan:       `python -m sensitivity scan model.pth --arch ... --calib calib.pt` (default options:
              calibration, isolated + cumulative errors, naive + SmoothQuant at 3 alphas, verification)
  fp-forward: a process that loads the same model and data the same way and runs one FP forward pass
  one-at-a-time (with --baseline): quantize one layer, run the whole model, compare, for every layer
and prints wall time and peak RSS ratios. Start-up is included on every side, as a user feels it.

Usage: .venv/bin/python benchmarks/scan_speed.py [--model resnet18|resnet50] [--images 32] [--repeats 3]
                                                  [--baseline] [--baseline-repeats 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import compare  # noqa: E402
from resnets import resnet18, resnet50  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet18")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extra", default="", help="extra scan options, e.g. '--calibrator entropy'")
    ap.add_argument("--baseline", action="store_true", help="also time the one-at-a-time baseline")
    ap.add_argument("--baseline-repeats", type=int, default=1)
    args = ap.parse_args()
    torch.manual_seed(0)
    build = {"resnet18": resnet18, "resnet50": resnet50}[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        torch.save(build().state_dict(), tmpd / "model.pth")
        torch.save(torch.randn(args.images, 3, 224, 224), tmpd / "calib.pt")
        arch = f"{HERE / 'resnets.py'}:{args.model}"
        py = sys.executable
        scan_cmd = [
            py,
            "-m",
            "sensitivity",
            "scan",
            str(tmpd / "model.pth"),
            "--arch",
            arch,
            "--calib",
            str(tmpd / "calib.pt"),
            "--batch-size",
            str(args.batch_size),
            "--out",
            str(tmpd / "report"),
            "--overwrite",
            "--quiet",
            *args.extra.split(),
        ]
        fp_cmd = [
            py,
            str(HERE / "fp_forward.py"),
            str(tmpd / "model.pth"),
            arch,
            str(tmpd / "calib.pt"),
            str(args.batch_size),
        ]
        res = compare({"scan": scan_cmd, "fp-forward": fp_cmd}, repeats=args.repeats)
        base = None
        if args.baseline:
            base_cmd = [py, str(HERE / "one_at_a_time.py"), str(tmpd / "model.pth"), arch, str(tmpd / "calib.pt"),
                        str(args.batch_size)]  # fmt: skip
            base = compare({"one-at-a-time": base_cmd}, repeats=args.baseline_repeats, warmup=0)[
                "one-at-a-time"
            ]
    a, b = res["scan"], res["fp-forward"]
    print(
        f"model {args.model}, {args.images} images 3x224x224, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}, medians of {args.repeats} runs (whole processes)"
    )
    print(f"  scan        wall {a.wall:7.2f} s   peak RSS {a.rss:8.1f} MiB")
    print(f"  FP forward  wall {b.wall:7.2f} s   peak RSS {b.rss:8.1f} MiB")
    print(f"  ratio scan / FP forward: time {a.wall / b.wall:.2f}x   peak memory {a.rss / b.rss:.2f}x")
    if base is not None:
        print(f"  one-at-a-time baseline  wall {base.wall:7.2f} s   peak RSS {base.rss:8.1f} MiB")
        print(f"  ratio one-at-a-time / scan: time {base.wall / a.wall:.1f}x (the scan is that much faster)")


if __name__ == "__main__":
    main()
