"""What a comparison pass accumulates: isolated errors per (layer, candidate), cumulative errors per layer,
the model-output errors, and with output probes each candidate's predicted output error."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from sensitivity.metrics import ErrorStats

__all__ = ["PassResult"]


@dataclass
class PassResult:
    """Accumulated errors: isolated per (layer, candidate), cumulative per layer, per model output; with
    output probes, each (layer, candidate)'s predicted output error."""

    iso: dict[tuple[str, str], ErrorStats] = field(default_factory=lambda: defaultdict(ErrorStats))
    cum: dict[str, ErrorStats] = field(default_factory=lambda: defaultdict(ErrorStats))
    out: dict[str, ErrorStats] = field(default_factory=lambda: defaultdict(ErrorStats))
    #: the quantized model's relative output MSE (Σ over outputs of ‖Δy‖² / ‖y‖² per batch piece),
    #: summed with weight = samples per piece; `out_weight` the total weight (see `out_rel_mse`)
    out_rel: float = 0.0
    out_weight: float = 0.0
    #: out_rel and pred hold shares of one `OutputEnergy` (sums, not sample-weighted ratios)
    energy_normalised: bool = False
    #: predicted relative output MSE per (layer, candidate) from the probes, weighted as `out_rel`
    pred: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    pred_weight: float = 0.0
    #: largest |probe gradient| at each layer's output on the first piece where one reached it (0 or
    #: absent: no gradient reached it; later pieces are not looked at)
    grad_max: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: why the probes' backward failed on some batch ("" when it never did)
    probe_failed: str = ""
    first_nonfinite: str | None = None
    first_nonfinite_rank: float = math.inf
    #: target layers that ran (in the quantized model) up to the first non-finite value, in order
    nonfinite_upstream: list[str] = field(default_factory=list)
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def output_stats(self) -> ErrorStats:
        total = ErrorStats()
        for s in self.out.values():
            total.merge(s)
        return total

    def out_rel_mse(self) -> float:
        """The measured relative output MSE of the quantized model (NaN before any batch): the sum of the
        pieces' shares under an `OutputEnergy`, else the pieces' own ratios averaged by samples."""
        if self.out_weight <= 0:
            return math.nan
        return self.out_rel if self.energy_normalised else self.out_rel / self.out_weight

    def predicted(self, layer: str, candidate: str) -> float:
        """The probes' predicted relative output MSE of `candidate` at `layer` alone (NaN: not predicted)."""
        if self.pred_weight <= 0 or (layer, candidate) not in self.pred:
            return math.nan
        value = self.pred[(layer, candidate)]
        return value if self.energy_normalised else value / self.pred_weight
