"""Entropy calibration: our vectorised search against pytorch-quantization 2.1.3's, same histograms.

    .venv/bin/python benchmarks/entropy_speed.py [--layers 20] [--num-bits 8] [--unsigned]

Builds one histogram per layer (2048 bins, grown over 4 calibration batches, exactly as
pytorch-quantization's HistogramCalibrator does), then times both entropy searches on it, one after the
other in this process, checks that they pick the same amax, and prints the per-layer and total speed-up.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

from sensitivity.quant.calibrators import compute_amax_entropy, make_calibrator

KINDS = ("relu", "outliers", "heavy", "laplace")


def layer_batches(layer: int, batches: int = 4) -> list[torch.Tensor]:
    """Activations of one layer: post-ReLU, outlier channels, heavy tails; a range that grows per batch."""
    g = torch.Generator().manual_seed(layer)
    kind = KINDS[layer % len(KINDS)]
    shape = (16, 32, 24, 24)
    out = []
    for b in range(batches):
        grow = 1.0 + 0.15 * b * (layer % 3 == 0)  # every third layer scaled up; others grow by chance
        if kind == "relu":
            x = torch.relu(torch.randn(shape, generator=g) + 0.2 * (layer % 5))
        elif kind == "outliers":
            x = torch.randn(shape, generator=g)
            x[:, (layer + b) % 32 :: 11] *= 10 + layer
        elif kind == "heavy":
            z = torch.randn(shape, generator=g)
            chi2 = sum(torch.randn(shape, generator=g) ** 2 for _ in range(3))
            x = z / torch.sqrt(chi2 / 3)
        else:
            u = torch.rand(shape, generator=g) - 0.5
            x = -torch.sign(u) * torch.log1p(-2 * u.abs())
        out.append(x * grow)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--num-bits", type=int, default=8)
    parser.add_argument("--unsigned", action="store_true")
    args = parser.parse_args()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from absl import logging as absl_logging
        from pytorch_quantization.calib.histogram import _compute_amax_entropy

    absl_logging.set_verbosity(absl_logging.ERROR)
    torch.set_num_threads(1)

    print(f"torch {torch.__version__}, numpy {np.__version__}, {args.num_bits}-bit, unsigned={args.unsigned}")
    print(f"{'layer':>5} {'kind':>9} {'bins':>5} {'pq s':>8} {'ours s':>8} {'ratio':>7} {'amax':>10} same")
    t_pq = t_ours = 0.0
    all_same = True
    for layer in range(args.layers):
        calib = make_calibrator("entropy", args.num_bits, args.unsigned)
        for x in layer_batches(layer):
            calib.collect(x)
        hist, edges = calib.histogram()
        h_int, e_np = (
            hist.numpy().astype(np.int32),
            edges.numpy(),
        )  # what pytorch-quantization hands its search

        start = time.perf_counter()
        ref = _compute_amax_entropy(h_int.copy(), e_np, args.num_bits, args.unsigned, 1, 128)
        dt_pq = time.perf_counter() - start
        start = time.perf_counter()
        ours = compute_amax_entropy(hist.numpy(), e_np, args.num_bits, args.unsigned)
        dt_ours = time.perf_counter() - start

        same = ours.item() == ref.item()
        all_same &= same
        t_pq += dt_pq
        t_ours += dt_ours
        kind = KINDS[layer % len(KINDS)]
        print(
            f"{layer:>5} {kind:>9} {hist.numel():>5} {dt_pq:>8.3f} {dt_ours:>8.4f} {dt_pq / dt_ours:>6.0f}x "
            f"{ours.item():>10.5f} {'yes' if same else 'NO'}"
        )
    print(f"total: pytorch-quantization {t_pq:.2f} s, ours {t_ours:.3f} s, speed-up {t_pq / t_ours:.0f}x")
    print("same amax on every layer" if all_same else "AMAX DIFFERS on some layer")


if __name__ == "__main__":
    main()
