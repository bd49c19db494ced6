"""The scan's dense-layer compute (convolutions, their backward, matrix products) against a plain FP forward.

Why: this is the floor under the scan's in-process time. Every pass the default scan's decisions are made
of (calibration, the held-out FP forward and the probes' backward, each layer's candidates, the quantized
pass, the exact checks, the verification) calls the layers' own kernels. None of the per-layer work a
faster implementation could remove (fake quantization, error sums, observers, histograms, hooks) is in it.
If this ratio alone reaches a time target, only doing fewer passes (other decisions) or running them on
bigger batches (more memory) can meet that target.

How: a `TorchDispatchMode` times each `aten.convolution`, `aten.convolution_backward`, `aten.addmm`,
`aten.mm` and `aten.bmm` call, and nothing else. Each call is booked to the scan phase that was running
(`PhaseProgress`: prepare, calibrate, scan, exact check, verify, ...; the held-out FP reference and the
quantized model's set-up run between phases). The same mode times one FP forward over the same batches,
which gives the FP forward's own dense share. The ratios divide by the plain FP forward's wall time, timed
without the mode (median of 3).

Dense layers only: spconv's CPU kernels run outside ATen, so the sparse layers of a LiDAR model are not
seen here.

Usage: .venv/bin/python benchmarks/dense_floor.py [--models mobilenet_v2,resnet50] [--images 32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sensitivity import ScanOptions, scan
from sensitivity.pipeline.options import PhaseProgress

__all__ = ["DenseFloor", "dense_floor"]

OUTSIDE = "between phases"
_DENSE = frozenset(
    {
        torch.ops.aten.convolution.default,
        torch.ops.aten.convolution_backward.default,
        torch.ops.aten.addmm.default,
        torch.ops.aten.mm.default,
        torch.ops.aten.bmm.default,
    }
)


class _DenseTimer(TorchDispatchMode):
    """Seconds spent inside the dense kernels, per label (`label` is set by `_Phases`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: Counter[str] = Counter()
        self.label = OUTSIDE

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func not in _DENSE:
            return func(*args, **(kwargs or {}))
        t = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.seconds[self.label] += time.perf_counter() - t
        return out


class _Phases(PhaseProgress):
    """Books the timer's calls to the scan phase running ("verify policy" and "verify exclusion" as one)."""

    def __init__(self, timer: _DenseTimer) -> None:
        self.timer = timer

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        outer, self.timer.label = self.timer.label, name.split(" (")[0].split(" ")[0]
        try:
            yield lambda: None
        finally:
            self.timer.label = outer


@dataclass
class DenseFloor:
    """Dense-kernel seconds of one scan per phase, of one FP forward, and the FP forward's plain wall time."""

    scan_s: dict[str, float]
    fp_dense_s: float
    fp_wall_s: float

    @property
    def ratio(self) -> float:
        """The scan's dense compute / the plain FP forward's wall time: the in-process ratio's floor."""
        return sum(self.scan_s.values()) / self.fp_wall_s

    def line(self) -> str:
        parts = ", ".join(
            f"{k} {v / self.fp_wall_s:.2f}x" for k, v in sorted(self.scan_s.items(), key=lambda kv: -kv[1])
        )
        return (
            f"dense-layer compute of the scan {self.ratio:.2f}x the FP forward ({parts}); the FP forward's "
            f"own: {self.fp_dense_s / self.fp_wall_s:.2f}x"
        )


def dense_floor(
    model: nn.Module, batches: list[torch.Tensor], options: ScanOptions | None = None, warm: bool = False
) -> DenseFloor:
    """One timed scan and FP forwards over `batches`, after an untimed scan (first calls allocate) unless
    `warm` (the caller has just scanned the same model and batches)."""
    options = options or ScanOptions()
    if not warm:
        scan(model, batches, options)
    walls = []
    for _ in range(3):
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                model(b)
        walls.append(time.perf_counter() - t)
    timer = _DenseTimer()
    with timer, torch.no_grad():
        for b in batches:
            model(b)
    fp_dense = sum(timer.seconds.values())
    timer.seconds.clear()
    with timer:
        scan(model, batches, options, progress=_Phases(timer))
    return DenseFloor(dict(timer.seconds), fp_dense, statistics.median(walls))


def main() -> None:
    import edge_speed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(edge_speed.MODELS))
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        factory, _, side = edge_speed.MODELS[name]
        torch.manual_seed(0)
        model = factory().eval()
        floor = dense_floor(model, edge_speed.image_batches(args.images, args.batch_size, side))
        print(f"{name}: {floor.line()}")


if __name__ == "__main__":
    main()
