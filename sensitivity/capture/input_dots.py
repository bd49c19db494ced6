"""The input side of the output probes, dotted inside the backward: no layer's input gradient is kept.

A candidate that only changes a layer's activation quantizer (another calibrator's amax) is scored by
g_x · (Q_c(x) - Q(x)), g_x the probes' gradient at the op's input. Kept until the FP pass's hooks, those
gradients were K copies (bfloat16) of every layer's input for the whole piece: on OpenPCDet's CenterPoint,
one LiDAR frame, 412 MiB of the scan's peak. Here the tap dots them as they pass, in the backward of the
last probe: earlier probes' gradients wait in one [K-1, ...] buffer (none at K = 1), the variants'
quantized inputs are computed once for all K, and the [K, samples] products are all that stays (every
gradient rounded through bfloat16 as the kept ones were: the same products as before, bit for bit). The FP
pass adds them to the naive candidate's products (`passes._Compare.fp_hook`), as it did with the kept
gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sensitivity.capture.dots import sample_dots
from sensitivity.methods.ranges import InputVariants

__all__ = ["InputDots", "VariantDots"]

#: per distinct amax among a layer's variants: (candidate keys, [K, samples] products; None where the amax
#: is the layer's own, whose score is the naive candidate's)
VariantDots = list[tuple[list[str], Tensor | None]]


class InputDots:
    """One input tap's probes: `add` receives each probe's gradient at the op's input (`x`, what the op
    received) and, at the last probe, dots all K with every variant's change of the quantized input."""

    __slots__ = ("buf", "count", "dots", "probes", "samples", "variants", "x")

    def __init__(self, probes: int, variants: InputVariants, samples: int | None) -> None:
        self.probes, self.variants, self.samples = probes, variants, samples
        #: the op's input, set once the tap made it (`probes._Recorder.input_clone`)
        self.x: Tensor | None = None
        self.count = 0
        self.buf: Tensor | None = None
        self.dots: VariantDots | None = None

    def add(self, g: Tensor) -> None:
        if self.count >= self.probes or self.x is None or g.shape != self.x.shape:
            return
        if self.count < self.probes - 1:  # wait for the last probe (bfloat16, as the output taps keep theirs)
            if self.buf is None:
                dtype = torch.bfloat16 if g.dtype == torch.float32 else g.dtype
                self.buf = torch.empty((self.probes - 1, *g.shape), dtype=dtype, device=g.device)
            self.buf[self.count].copy_(g)
            self.count += 1
            return
        gk = g.unsqueeze(0) if self.buf is None else torch.cat((self.buf.to(g.dtype), g.unsqueeze(0)))
        if gk.dtype == torch.float32:  # rounded as a kept gradient is (`probes._Slot`): the same products
            gk = gk.to(torch.bfloat16).float()
        with torch.no_grad():
            self.dots = [
                (keys, None if err is None else sample_dots(gk, err, self.samples))
                for keys, err in self.variants.errors(self.x)
            ]
        self.count += 1
        self.buf, self.x = None, None

    def kept(self) -> VariantDots | None:
        """Every variant's products, or None where some probe's gradient did not reach the tap."""
        return self.dots if self.count == self.probes else None
