"""Scan cost against a plain FP forward over the same batches, as whole processes.

Builds a ResNet-18-shaped model (random weights, realistic BN statistics) and 32 random 3x224x224
images, saves them like a user would, then runs alternately (medians of --repeats runs):
  A: `python -m sensitivity scan model.pth --arch ... --calib calib.pt` (default options)
  B: a process that loads the same model and data the same way and runs one FP forward pass
and prints wall time A/B and peak RSS A/B.

Usage: .venv/bin/python benchmarks/scan_speed.py [--model resnet18|resnet50] [--images 32] [--repeats 3]
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
    a, b = res["scan"], res["fp-forward"]
    print(
        f"model {args.model}, {args.images} images 3x224x224, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}, medians of {args.repeats} runs (whole processes)"
    )
    print(f"  scan        wall {a.wall:7.2f} s   peak RSS {a.rss:8.1f} MiB")
    print(f"  FP forward  wall {b.wall:7.2f} s   peak RSS {b.rss:8.1f} MiB")
    print(f"  ratio scan / FP forward: time {a.wall / b.wall:.2f}x   peak memory {a.rss / b.rss:.2f}x")


if __name__ == "__main__":
    main()
