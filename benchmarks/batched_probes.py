"""K output probes in one batched backward (`is_grads_batched=True`) against K sequential backwards.

Why: the scan keeps each probe's gradient at every layer until the layer's candidates are dotted with it
(K bfloat16 copies of a piece's activations at K=4). Were the K probes taken in one batched backward, each
layer's dots could be computed inside the backward as its gradient passes, and no gradient would outlive
its layer: pieces 2-3x larger within the same memory. That only pays if the batched backward is not slower.

Per model, in one run, on one piece of `--images` images: an FP forward with autograd whose target layers
pass through an identity `autograd.Function` that dots its gradient with a fixed tensor (what the scan's
dots would be) and returns the dots as the gradient of a per-layer sink, then either one batched backward
of K probes or K sequential ones over the same graph; the dots are checked equal, the times are medians.

Usage: .venv/bin/python benchmarks/batched_probes.py [--models mobilenet_v2,yolov8n] [--images 8] [--probes 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import edge_models  # noqa: E402


class _DotTap(torch.autograd.Function):
    """Identity; its backward dots the gradient with `d` per sample and hands that to `sink`'s gradient."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, sink: torch.Tensor, d: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.d = d
        return t.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:  # type: ignore[override]
        n = g.shape[0]
        return g, torch.linalg.vecdot(g.reshape(n, -1), ctx.d.reshape(n, -1)), None


class _Probed:
    def __init__(self, model: nn.Module) -> None:
        self.model, self.sinks = model, []  # type: ignore[var-annotated]
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.register_forward_hook(self._hook)

    def _hook(self, m: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor:
        sink = torch.zeros(y.shape[0], requires_grad=True)
        self.sinks.append(sink)
        gen = torch.Generator().manual_seed(len(self.sinks))
        return _DotTap.apply(y, sink, torch.randn(y.shape, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sinks = []
        out = self.model(x)
        return out if isinstance(out, torch.Tensor) else torch.cat([t.flatten(1) for t in out], 1)

    def batched(self, x: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
        with torch.enable_grad():
            y = self.forward(x)
            return list(torch.autograd.grad(y, self.sinks, r, is_grads_batched=True))

    def sequential(self, x: torch.Tensor, r: torch.Tensor) -> list[torch.Tensor]:
        with torch.enable_grad():
            y = self.forward(x)
            per_probe = [
                torch.autograd.grad(y, self.sinks, r[k], retain_graph=k < len(r) - 1) for k in range(len(r))
            ]
        return [torch.stack([p[i] for p in per_probe]) for i in range(len(self.sinks))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,yolov8n")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--probes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    k = args.probes
    print(
        f"| model | images | batched backward ({k} probes) | sequential | batched / sequential | dots equal |"
    )
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        side = 320 if name.startswith("yolo") else 224
        probed = _Probed(edge_models.build(name).eval())
        x = torch.rand(args.images, 3, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            shape = probed.forward(x).shape
        r = (
            torch.randint(0, 2, (args.probes, *shape), generator=torch.Generator().manual_seed(1)).float() * 2
            - 1
        )
        a, b = probed.batched(x, r), probed.sequential(x, r)
        equal = all(torch.allclose(u, v, rtol=1e-4, atol=1e-6) for u, v in zip(a, b, strict=True))
        times: dict[str, list[float]] = {"batched": [], "sequential": []}
        for _ in range(args.repeats):
            for label, fn in (("batched", probed.batched), ("sequential", probed.sequential)):
                t = time.perf_counter()
                fn(x, r)
                times[label].append(time.perf_counter() - t)
        tb, ts = statistics.median(times["batched"]), statistics.median(times["sequential"])
        print(f"| {name} | {args.images} | {tb:.2f} s | {ts:.2f} s | {tb / ts:.2f}x | {equal} |")


if __name__ == "__main__":
    main()
