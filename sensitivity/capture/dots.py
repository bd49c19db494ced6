"""Per-sample dot products of the probes' gradients with a layer's error: the one inner loop of the output probes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sample_dots"]

#: rows at least this long are dotted one by one (BLAS), shorter ones by one vectorised `vecdot`
_LONG_ROW = 1 << 15


def sample_dots(g: Tensor | Sequence[Tensor], d: Tensor, samples: int | None) -> Tensor:
    """[K, G] dot products of each probe's gradient (`g`: one [K, *shape] tensor, or K tensors shaped like
    `d`) with `d`, per sample where dim 0 is the batch (G = samples), else over the whole tensor (G = 1),
    in float64. Long rows: one BLAS matrix-vector product [K, n] x [n] per sample (torch's batched forms,
    bmm and einsum, of these row-by-row products ran 6x slower on CPU); short rows: one vectorised op."""
    gk = g if isinstance(g, Tensor) else torch.stack(list(g))
    k = gk.shape[0]
    groups = samples if samples and d.dim() > 0 and d.shape[0] == samples else 1
    gg = gk.reshape(k, groups, -1)
    dk = d.reshape(groups, -1).to(gk.dtype)
    if gg.shape[2] < _LONG_ROW:
        return torch.linalg.vecdot(gg, dk.unsqueeze(0)).double()
    return torch.stack([torch.mv(gg[:, i], dk[i]) for i in range(groups)], dim=1).double()
