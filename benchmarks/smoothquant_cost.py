"""What SmoothQuant's alpha search costs, and the im2col path's memory.

1. A ResNet-18-shaped model (random weights, realistic BN statistics), 32 random 3x224x224 images:
   `sensitivity scan` with the default alpha (0.5, channel granularity) and with a 3-alpha grid, against
   `sensitivity scan --no-smoothquant`, as whole processes, alternated; medians of --repeats runs.
2. One 3x3 conv (64 -> 64 channels, 8x64x112x112 input): peak memory of the im2col + GEMM path above the
   input itself, relative to the input size, unchunked (one unfold: kh*kw = 9x the input) and chunked
   (the toolkit's path), each measured in its own process as peak RSS growth.

Usage: .venv/bin/python benchmarks/smoothquant_cost.py [--repeats 3] [--skip-scan]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import compare  # noqa: E402
from resnets import resnet18  # noqa: E402

_IM2COL_CHILD = r"""
import resource, sys, torch
from torch import nn
from sensitivity.methods.im2col import im2col_conv, CHUNK_ELEMS
torch.manual_seed(0)
mode = sys.argv[1]
x = torch.randn(8, 64, 112, 112)
conv = nn.Conv2d(64, 64, 3, padding=1)
with torch.no_grad():
    y = conv(x)  # the output exists in every variant: measure above input + output
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "unchunked":
        cols = nn.functional.unfold(x, 3, padding=1)  # [N, C*9, L]: the notes' single unfold
        out = cols.transpose(1, 2) @ conv.weight.reshape(64, -1).t()
        del cols, out
    elif mode == "chunked":
        out = im2col_conv(conv, x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "chunked":
        assert (out - y).abs().max() < 1e-3
print((peak - base) * 1024 / (x.numel() * 4))
"""


def im2col_memory() -> dict[str, float]:
    out = {}
    for mode in ("unchunked", "chunked"):
        res = subprocess.run(
            [sys.executable, "-c", _IM2COL_CHILD, mode], capture_output=True, text=True, check=True
        )
        out[mode] = float(res.stdout.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--skip-scan", action="store_true")
    args = ap.parse_args()
    if not args.skip_scan:
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            tmpd = Path(tmp)
            torch.save(resnet18().state_dict(), tmpd / "model.pth")
            torch.save(torch.randn(args.images, 3, 224, 224), tmpd / "calib.pt")
            base = [sys.executable, "-m", "sensitivity", "scan", str(tmpd / "model.pth"),
                    "--arch", f"{HERE / 'resnets.py'}:resnet18", "--calib", str(tmpd / "calib.pt"),
                    "--out", str(tmpd / "r"), "--overwrite", "--quiet"]  # fmt: skip
            res = compare(
                {
                    "default": base,
                    "3-alphas": [*base, "--alpha-grid", "0.25,0.5,0.75"],
                    "no-sq": [*base, "--no-smoothquant"],
                },
                repeats=args.repeats,
            )
        b = res["no-sq"]
        print(f"ResNet-18 shapes, {args.images} images, medians of {args.repeats} whole-process runs")
        print(f"  scan without SmoothQuant        wall {b.wall:7.2f} s   peak RSS {b.rss:8.1f} MiB")
        for key, label in (("default", "default (alpha 0.5)"), ("3-alphas", "alpha grid 0.25,0.5,0.75")):
            a = res[key]
            print(
                f"  scan, {label:<25} wall {a.wall:7.2f} s   peak RSS {a.rss:8.1f} MiB   "
                f"ratio to no SmoothQuant: time {a.wall / b.wall:.2f}x, memory {a.rss / b.rss:.2f}x"
            )
    mem = im2col_memory()
    print("im2col path, one 3x3 conv 64->64 on 8x64x112x112 (peak RSS growth / input size):")
    print(f"  unchunked unfold + GEMM  {mem['unchunked']:.2f}x the input")
    print(f"  chunked (toolkit)        {mem['chunked']:.2f}x the input")


if __name__ == "__main__":
    main()
