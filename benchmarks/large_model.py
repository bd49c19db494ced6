"""Memory of a scan of a deep synthetic stack (1,000+ target layers): it must grow with one batch's
activations, not with layers x batches. Each configuration runs in its own process; prints peak RSS and
wall time of the scan (in-process, model built there) for a few depths and batch counts.

Usage: .venv/bin/python benchmarks/large_model.py
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import resource, sys, time, torch
from torch import nn
from sensitivity import ScanOptions, scan
depth, n_batches, width = int(sys.argv[1]), int(sys.argv[2]), 64
torch.manual_seed(0)
layers = []
for _ in range(depth):
    layers += [nn.Linear(width, width), nn.ReLU()]
model = nn.Sequential(*layers).eval()
with torch.no_grad():  # keep activations O(1) through a deep random stack
    for m in model:
        if isinstance(m, nn.Linear):
            m.weight.mul_(1.4)
batches = [torch.randn(256, width) for _ in range(n_batches)]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
r = scan(model, batches, ScanOptions(alphas=(0.5,)))
wall = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{len(r.table)}\t{(peak - base) / 1024:.1f}\t{peak / 1024:.1f}\t{wall:.2f}")
"""


def main() -> None:
    print("depth  batches  target layers  scan RSS growth MiB  peak RSS MiB  wall s")
    for depth, n in ((250, 4), (1000, 4), (1000, 16), (2000, 4)):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(depth), str(n)], capture_output=True, text=True
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-2000:])
        layers, growth, peak, wall = out.stdout.strip().splitlines()[-1].split("\t")
        print(f"{depth:5d}  {n:7d}  {layers:>13}  {growth:>19}  {peak:>12}  {wall:>6}")
    print("(one batch's stored activations: 1,000 layers x 256 x 64 floats = 62.5 MiB)")


if __name__ == "__main__":
    main()
