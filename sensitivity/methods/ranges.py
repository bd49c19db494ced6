"""Per-layer activation ranges: the same layer quantized with another calibrator's amax (max, percentiles of
|x|, the MSE-optimal range), every one computed from the one histogram its calibration pass kept.

Such a candidate changes only the input quantizer, so its effect is scored without a layer call: the
output probes dot the change of the quantized input, Q_c(x) - Q(x), with their gradient at the layer's
input (`InputVariants.errors`), and add that to the naive candidate's score. To first order this is the
candidate's own output error (the layer is linear in its input; the cross term with the weight's own
quantization error is second order).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from sensitivity.quant.quantizer import TensorQuantizer

__all__ = ["InputVariants", "range_key"]


def range_key(choice: str) -> str:
    """Candidate / column name of a calibrator choice: `naive_p99.99`, `naive_mse`, `naive_max`."""
    return f"naive_{choice}"


class InputVariants:
    """A layer's input quantized with other amax values than its own (`base`, the naive quantizer)."""

    def __init__(self, base: TensorQuantizer, amaxes: Mapping[str, torch.Tensor]) -> None:
        self.base = base
        #: one quantizer per distinct amax (the percentiles of a light-tailed input often coincide with each
        #: other or with max), with the candidate keys it stands for
        self.groups: dict[float, tuple[list[str], TensorQuantizer]] = {}
        for choice, amax in amaxes.items():
            value = float(amax)
            if value not in self.groups:
                q = TensorQuantizer(base.num_bits, axis=None, unsigned=base.unsigned)
                q.set_amax(amax)
                self.groups[value] = ([], q)
            self.groups[value][0].append(range_key(choice))

    def errors(self, x: torch.Tensor) -> Iterator[tuple[list[str], torch.Tensor | None]]:
        """(candidate keys, Q_c(x) - Q(x)) per distinct amax among the variants; None for the keys whose
        amax is the layer's own (no change: their score is naive's)."""
        x = x.detach()
        own_value = float(self.base.amax) if self.base.amax is not None else None
        if own_value in self.groups:
            yield self.groups[own_value][0], None
        own: torch.Tensor | None = None
        for value, (keys, q) in self.groups.items():
            if value == own_value:
                continue
            own = self.base(x) if own is None else own
            err = q(x)
            # in place where q made a new tensor (it always does when enabled): one sweep less than `-`
            yield keys, err.sub_(own) if err is not x else err - own
