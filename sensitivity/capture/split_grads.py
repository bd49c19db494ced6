"""Probe gradients of a piece probed in parts: small batches cost far more per sample on CPU than big ones,
so where the probes' autograd forward of a whole piece would not fit the memory budget, the probes run on
consecutive parts of it and the piece's FP pass (candidates, dot products) then runs once over all of it.
The parts' gradients line up with the whole piece's tensors along dim 0 (the samples), part after part."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sensitivity.capture.dots import sample_dots
from sensitivity.capture.input_dots import VariantDots
from sensitivity.capture.probes import ProbeGrads

__all__ = ["GradParts", "SplitGrads", "grad_absmax", "grad_dots", "lines_up"]


def lines_up(grads: ProbeGrads) -> bool:
    """Every gradient has the piece's samples along dim 0 of its tap (dim 1 of [K, *shape]): pieces probed
    apart then line up, in order, along dim 0 of the tensors of a pass over all of them."""
    n = grads.samples
    return (
        bool(n)
        and all(
            g is None or (g.dim() >= 2 and g.shape[1] == n)
            for side in (grads.out, grads.inp)
            for q in side.values()
            for g in q
        )
        and all(d is None or d.shape[1] == n for q in grads.inp_dots.values() for v in q if v for _, d in v)
    )


@dataclass(frozen=True)
class GradParts:
    """One layer call's probe gradients over a piece whose probes ran on consecutive pieces of it: one
    [K, s_i, *shape] tensor per part, the parts' samples in order along the piece's dim 0."""

    parts: tuple[Tensor, ...]

    def dots(self, d: Tensor) -> Tensor:
        """[K, samples] dot products with `d` (the whole piece's tensor), part by part: per sample, the same
        products as each part's own `sample_dots`."""
        total = sum(g.shape[1] for g in self.parts)
        if d.dim() == 0 or d.shape[0] != total:
            raise ValueError(
                f"probe gradients over {total} samples do not line up with a tensor of shape {tuple(d.shape)}"
            )
        out, start = [], 0
        for g in self.parts:
            n = g.shape[1]
            out.append(sample_dots(g, d[start : start + n], n))
            start += n
        return torch.cat(out, dim=1)


class SplitGrads:
    """The probe gradients of a piece whose probes ran on consecutive pieces of it (each `lines_up`), for a
    pass over the whole piece: `take` as `ProbeGrads.take`, each gradient `GradParts`."""

    def __init__(self, parts: Sequence[ProbeGrads]) -> None:
        self.parts = list(parts)
        self.probes = self.parts[0].probes
        #: each part's samples (`lines_up`: one dot product column each, in order)
        self.sizes = [p.samples or 0 for p in self.parts]
        self.samples = sum(self.sizes)
        self.failed = next((p.failed for p in self.parts if p.failed), "")

    def take(self, name: str) -> tuple[GradParts | None, GradParts | None]:
        outs, ins = zip(*(p.take(name) for p in self.parts), strict=True)
        return _joined(outs), _joined(ins)

    def take_dots(self, name: str) -> VariantDots | None:
        """`ProbeGrads.take_dots` over the whole piece: each variant's products, part after part along the
        samples (None where some part's gradient did not reach the tap)."""
        parts = [p.take_dots(name) for p in self.parts]
        if any(v is None for v in parts):
            return None
        first = parts[0]
        assert first is not None
        joined: VariantDots = []
        for i, (keys, d) in enumerate(first):
            pieces = [v[i][1] for v in parts if v is not None]
            joined.append(
                (keys, None if d is None else torch.cat([t for t in pieces if t is not None], dim=1))
            )
        return joined


def _joined(grads: Sequence[Tensor | None]) -> GradParts | None:
    """Every part's gradient, or None where one did not reach the tap (as a whole piece's would not)."""
    if any(g is None for g in grads):
        return None
    return GradParts(tuple(g for g in grads if g is not None))


def grad_dots(g: Tensor | GradParts, d: Tensor, samples: int | None) -> Tensor:
    """`sample_dots` for one piece's gradient, whether probed whole or in parts."""
    return g.dots(d) if isinstance(g, GradParts) else sample_dots(g, d, samples)


def grad_absmax(g: Tensor | GradParts) -> float:
    """Largest |gradient| of one piece's gradient, whether probed whole or in parts (no |g| copy)."""
    top = 0.0
    for t in g.parts if isinstance(g, GradParts) else (g,):
        lo, hi = torch.aminmax(t)
        top = max(top, -float(lo), float(hi))
    return top
