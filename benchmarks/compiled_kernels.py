"""torch.compile for the scan's hot elementwise kernels: what it would save against what it costs.

Why: fake quantization (x / s, round, clamp, x s) and the error sums of `ErrorStats.update` (difference,
two dot products, min/max, sum of |d|) are several eager sweeps each, on every activation of every layer
and candidate. A compiled (inductor, C++) kernel does each in one sweep. Measured in one run:

1. per call, at the sizes of MobileNetV2's activations (one image, and a batch of 8): eager against
   compiled, for the fake quantization and for the error sums; the compiled codes are checked
   bit-identical to eager's (the ONNX convention the ORT tests hold the toolkit to);
2. compile time, each in a fresh process: cold (an empty inductor cache: a user's first scan) and warm (the
   cache a previous process left), for both kernels and one activation rank;
3. what a default MobileNetV2 scan (16 images, batches of 8) spends inside those two kernels, timed
   around each call: the most compiling them could save in that scan.

Usage: .venv/bin/python benchmarks/compiled_kernels.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from sensitivity.metrics import ErrorStats  # noqa: E402
from sensitivity.quant.fake import fake_quant  # noqa: E402

SIZES = {"1 x 96 x 112 x 112": (1, 96, 112, 112), "8 x 96 x 112 x 112": (8, 96, 112, 112),
         "1 x 320 x 7 x 7": (1, 320, 7, 7)}  # fmt: skip


def quantize(x: torch.Tensor, s: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The compiled form of `fake_quant` (per tensor): one sweep, one output."""
    return torch.clamp(torch.round(x / s), qmin, qmax) * s


def error_sums(test: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """The compiled form of `ErrorStats.update`'s fast path: the five sums in one fused reduction."""
    d = test - ref
    return torch.stack(((d * d).sum(), (ref * d).sum(), d.amin(), d.amax(), d.abs().sum()))


def _per_call(fn: Callable[[], object], seconds: float = 0.5) -> float:
    """Median-free mean ms per call over about `seconds` after one warm-up call."""
    fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n * 1e3


def kernels() -> None:
    cq = torch.compile(quantize, dynamic=True)
    cs = torch.compile(error_sums, dynamic=True)
    s = torch.tensor(0.03)
    print("| activation | fake quant eager | compiled | error sums eager | compiled | codes identical |")
    print("|---|---|---|---|---|---|")
    for label, shape in SIZES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g) * 2
        ref = x + 0.01 * torch.randn(shape, generator=g)
        same = torch.equal(fake_quant(x, s, 8), cq(x, s, -128, 127))
        fq_e = _per_call(lambda x=x: fake_quant(x, s, 8))
        fq_c = _per_call(lambda x=x: cq(x, s, -128, 127))
        es_e = _per_call(lambda x=x, ref=ref: ErrorStats().update(ref, x))
        es_c = _per_call(lambda x=x, ref=ref: cs(x.reshape(-1), ref.reshape(-1)).tolist())
        print(f"| {label} | {fq_e:.3f} ms | {fq_c:.3f} ms | {es_e:.3f} ms | {es_c:.3f} ms | {same} |")


_COMPILE_ONE = """
import sys, time, json
t0 = time.perf_counter()
import torch
sys.path[:0] = {paths!r}
from compiled_kernels import quantize, error_sums
torch.set_num_threads({threads})
x = torch.randn(1, 96, 112, 112); s = torch.tensor(0.03)
t1 = time.perf_counter()
torch.compile(quantize, dynamic=True)(x, s, -128, 127)
t2 = time.perf_counter()
torch.compile(error_sums, dynamic=True)(x.reshape(-1), x.reshape(-1))
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "quantize": t2 - t1, "error_sums": t3 - t2}}))
"""


def compile_times(threads: int) -> None:
    code = _COMPILE_ONE.format(paths=[str(HERE), str(HERE.parent)], threads=threads)
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        print("\n| process | import torch | compile fake quant | compile error sums |")
        print("|---|---|---|---|")
        for label in ("cold (empty cache)", "warm (cache kept)", "warm again"):
            out = subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            )
            t = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {label} | {t['import']:.2f} s | {t['quantize']:.2f} s | {t['error_sums']:.2f} s |")


def scan_share() -> None:
    """Seconds a default MobileNetV2 scan spends in the two kernels (timed around each call)."""
    import edge_models

    import sensitivity.metrics as metrics
    import sensitivity.quant.quantizer as quantizer
    from sensitivity import ScanOptions, scan

    spent = {"fake_quant": 0.0, "ErrorStats.update": 0.0}
    orig_fq, orig_update = quantizer.fake_quant, metrics.ErrorStats.update

    def timed_fq(*a: object, **k: object) -> torch.Tensor:
        t = time.perf_counter()
        try:
            return orig_fq(*a, **k)  # type: ignore[arg-type]
        finally:
            spent["fake_quant"] += time.perf_counter() - t

    def timed_update(self: ErrorStats, *a: object, **k: object) -> None:
        t = time.perf_counter()
        try:
            orig_update(self, *a, **k)  # type: ignore[arg-type]
        finally:
            spent["ErrorStats.update"] += time.perf_counter() - t

    model = edge_models.mobilenet_v2().eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(8, 3, 224, 224, generator=g) for _ in range(2)]
    scan(model, batches[:1], ScanOptions(probes=0))  # warm-up
    quantizer.fake_quant, metrics.ErrorStats.update = timed_fq, timed_update  # type: ignore[method-assign]
    try:
        t = time.perf_counter()
        scan(model, batches, ScanOptions())
        total = time.perf_counter() - t
    finally:
        quantizer.fake_quant, metrics.ErrorStats.update = orig_fq, orig_update  # type: ignore[method-assign]
    inside = sum(spent.values())
    print(f"\nMobileNetV2 default scan, 16 images: {total:.2f} s; fake quantization {spent['fake_quant']:.2f} s, "
          f"error sums {spent['ErrorStats.update']:.2f} s (the latter includes the probes' dot products of each "
          f"difference); together {inside / total:.0%} of the scan")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kernels()
    compile_times(args.threads)
    scan_share()


if __name__ == "__main__":
    main()
