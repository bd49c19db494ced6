"""The im2col + GEMM view of a dense convolution, chunked, with per-column SmoothQuant (research only).

A conv is X_unf[N·L, Cin·k] · W[Cout, Cin·k]ᵀ per group, where X_unf holds every receptive field (im2col).
Per-column factors (one per Cin·k column) can only be applied on that unfolded matrix, which costs k
times the input, so no deployed engine runs them: the research notes' method, kept to measure what
finer-than-channel smoothing could gain. Rows are processed in chunks along the first output spatial
dimension and only each chunk's input slab is padded, so the unfolded matrix never exists whole: the path
needs its output plus a few chunk-sized temporaries (measured in benchmarks/smoothquant_cost.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity.quant.fake import amax_to_scale, fake_quant
from sensitivity.quant.modules import QuantMixin, QuantWrapped, is_wrapped_kind, per_channel_amax

__all__ = [
    "Im2colCandidate",
    "im2col_chunks",
    "im2col_column_absmax",
    "im2col_conv",
    "im2col_refusal",
    "weight_column_absmax",
]

#: Unfolded elements per chunk (float32: 16 MiB): bounds the im2col path's extra memory.
CHUNK_ELEMS = 1 << 22


def im2col_refusal(module: nn.Module) -> str | None:
    """Why a layer has no im2col form here, or None when it has one."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return f"{type(module).__name__} has no im2col form here (dense Conv1d/2d/3d only)"
    if isinstance(module, QuantWrapped) or is_wrapped_kind(module):
        return (
            f"{type(module).__name__}'s own forward wraps the conv (the im2col path runs the plain conv only)"
        )
    if getattr(module, "padding_mode", "zeros") != "zeros":
        return f"padding_mode={module.padding_mode!r} (im2col path pads with zeros only)"  # type: ignore[attr-defined]
    if isinstance(module.padding, str):  # type: ignore[attr-defined]
        return f"padding={module.padding!r} (give explicit padding for the im2col path)"  # type: ignore[attr-defined]
    return None


def _geometry(
    module: nn.Module, x: torch.Tensor
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    nd = x.dim() - 2
    k = list(module.kernel_size)  # type: ignore[attr-defined]
    st = list(module.stride)  # type: ignore[attr-defined]
    dil = list(module.dilation)  # type: ignore[attr-defined]
    pad = list(module.padding)  # type: ignore[attr-defined]
    out = [(x.shape[2 + d] + 2 * pad[d] - dil[d] * (k[d] - 1) - 1) // st[d] + 1 for d in range(nd)]
    return k, st, dil, pad, out


def _slab(x: torch.Tensor, lo: int, hi: int, pad: list[int]) -> torch.Tensor:
    """Rows [lo, hi) of the zero-padded input along dim 2, padding only this slab (never the whole input)."""
    h = x.shape[2]
    a, b = lo - pad[0], hi - pad[0]  # in unpadded coordinates
    part = x.narrow(2, max(a, 0), max(0, min(b, h) - max(a, 0)))
    pads: list[int] = []
    for p in reversed(pad[1:]):
        pads += [p, p]
    pads += [max(0, -a), max(0, b - h)]
    return F.pad(part, pads) if any(pads) else part


def im2col_chunks(
    module: nn.Module, x: torch.Tensor, chunk_elems: int = CHUNK_ELEMS
) -> Iterator[torch.Tensor]:
    """Yield X_unf in row chunks: each [N, rows_of_chunk..., Cin·k] with columns ordered (c, k...) like
    `weight.reshape(Cout, -1)`. Chunks split the first output spatial dimension; only each chunk's input
    slab is padded, so the extra memory is one chunk, whatever the input size."""
    k, st, dil, pad, out = _geometry(module, x)
    n, c = x.shape[:2]
    nd = len(k)
    cols = c * math.prod(k)
    per_row = n * cols * math.prod(out[1:])
    step = max(1, chunk_elems // max(per_row, 1))
    for r0 in range(0, out[0], step):
        r1 = min(out[0], r0 + step)
        lo = r0 * st[0]
        hi = (r1 - 1) * st[0] + dil[0] * (k[0] - 1) + 1
        v = _slab(x, lo, hi, pad)
        for d in range(nd):
            span = dil[d] * (k[d] - 1) + 1
            v = v.unfold(2 + d, span, st[d])[..., :: dil[d]]
        # v: [N, C, o0, o1, ..., k0, k1, ...] -> [N, o0, o1, ..., C, k0, k1, ...]
        perm = [0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)]
        yield v.permute(perm).reshape(n, r1 - r0, *out[1:], cols)


def im2col_column_absmax(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-column max |X_unf| (what static im2col smoothing needs), chunk by chunk."""
    best: torch.Tensor | None = None
    for chunk in im2col_chunks(module, x.detach()):
        m = chunk.abs().reshape(-1, chunk.shape[-1]).amax(dim=0)
        best = m if best is None else torch.maximum(best, m)
    assert best is not None
    return best.float()


def weight_column_absmax(module: nn.Module) -> torch.Tensor:
    """Per-column max |W| over the output channels of the column's group: [Cin·k]."""
    w = module.weight.detach().abs()  # type: ignore[attr-defined]
    g = module.groups  # type: ignore[attr-defined]
    cout = w.shape[0]
    flat = w.reshape(g, cout // g, -1)
    return flat.amax(dim=1).reshape(-1).float()


def im2col_conv(
    module: nn.Module,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    col_scale: torch.Tensor | None = None,
    act_amax: torch.Tensor | None = None,
    a_bits: int = 8,
) -> torch.Tensor:
    """The conv as chunked im2col + grouped GEMM. With `col_scale`, X_unf columns are divided by it;
    with `act_amax`, the (scaled) X_unf is fake-quantized per tensor. `weight` defaults to the module's
    and must already include any column scaling and quantization."""
    w = module.weight if weight is None else weight  # type: ignore[attr-defined]
    g = module.groups  # type: ignore[attr-defined]
    cout = w.shape[0]
    wg = w.reshape(g, cout // g, -1)  # [g, Cout/g, Cin/g·k]
    inv = None if col_scale is None else (1.0 / col_scale).to(device=x.device, dtype=x.dtype)
    scale = None if act_amax is None else amax_to_scale(act_amax, a_bits, False).to(x.device)
    out_shape = _geometry(module, x)[4]
    y = x.new_empty(x.shape[0], cout, *out_shape)
    bias = module.bias  # type: ignore[attr-defined]
    r0 = 0
    for chunk in im2col_chunks(module, x):
        lead = chunk.shape[:-1]
        rows = chunk.reshape(-1, chunk.shape[-1])
        if inv is not None:
            rows = rows * inv
        if scale is not None:
            rows = fake_quant(rows, scale, a_bits, False)
        rg = rows.reshape(rows.shape[0], g, -1).transpose(0, 1)  # [g, R, Cin/g·k]
        part = torch.bmm(rg, wg.transpose(1, 2)).transpose(0, 1).reshape(*lead, cout)
        del rows, rg
        if bias is not None:
            part += bias
        y.narrow(2, r0, lead[1]).copy_(part.movedim(-1, 1))
        r0 += lead[1]
    return y


@dataclass
class Im2colCandidate:
    """Per-column SmoothQuant of one dense conv, on the chunked im2col path (static or dynamic)."""

    qmod: QuantMixin
    alpha: float
    mode: str
    a_bits: int
    col_absmax: torch.Tensor | None = None  # static: per-column max |X_unf| over the fitting batches

    def __post_init__(self) -> None:
        self.w_col = weight_column_absmax(self.qmod)  # type: ignore[arg-type]
        self._static = self._state(self.col_absmax) if self.mode == "static" else None

    def _state(self, col_absmax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from sensitivity.methods.smoothquant import smoothed_input_amax, smoothing_factors

        assert col_absmax is not None
        q = self.qmod
        s = smoothing_factors(col_absmax, self.w_col, self.alpha).to(q.weight.device)
        cout = q.weight.shape[0]
        g = q.groups  # type: ignore[attr-defined]
        w = q.weight.detach().reshape(g, cout // g, -1) * s.reshape(g, 1, -1)
        w = w.reshape(cout, -1)
        wq = q.weight_quantizer
        w_amax = per_channel_amax(w, 0)
        w_q = fake_quant(w, amax_to_scale(w_amax, wq.num_bits, False), wq.num_bits, False, 0)
        return s, smoothed_input_amax(col_absmax.to(s.device), s), w_q.reshape(q.weight.shape)

    @property
    def factors(self) -> torch.Tensor | None:
        return None if self._static is None else self._static[0]

    def __call__(self, args: tuple) -> Any:
        x = args[0]
        state = self._static or self._state(im2col_column_absmax(self.qmod, x))  # type: ignore[arg-type]
        s, amax, w_q = state
        return im2col_conv(self.qmod, x, w_q, s, amax, self.a_bits)  # type: ignore[arg-type]
