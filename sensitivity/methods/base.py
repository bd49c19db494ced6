"""Per-layer remedies as one concept: a `Method` is what a layer can get (FP, naive W8A8, SmoothQuant at some
alpha / granularity / mode), described the same way for the scan's candidates, the policy YAML and the
final model.

Each method fits its numbers from a layer's calibration statistics once (`fit`: the `LayerQuant` that
`configure_layers` installs), scores itself on the FP input during the scan (`candidate`), and writes
itself as a policy rule (`rule`). `Method.of(rule)` reads one back from a (possibly user-edited) policy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from sensitivity.errors import ConfigError
from sensitivity.quant.build import LayerQuant
from sensitivity.quant.modules import QuantMixin

__all__ = ["FP", "NAIVE", "Candidate", "LayerStats", "Method", "deployable", "sq_key"]

#: A scan-time candidate: given a layer's FP call args, the candidate's output for them.
Candidate = Callable[[tuple], Any]


class LayerStats(Protocol):
    """What calibration kept of a layer's input (`sensitivity.capture.observe.LayerObserver` is one)."""

    chan_absmax: torch.Tensor | None
    col_absmax: torch.Tensor | None
    nonnegative: bool

    def amax(self, unsigned: bool | None = None) -> torch.Tensor: ...

    def unsigned(self) -> bool: ...

    def calibrator_amax(self, choice: str, unsigned: bool | None = None) -> torch.Tensor: ...


def sq_key(granularity: str, alpha: float) -> str:
    """Candidate name, e.g. `sq_channel_0.5` / `sq_im2col_0.75`."""
    return f"sq_{granularity}_{alpha:g}"


def deployable(key: str) -> bool:
    """Can a deployable policy pick this candidate? Naive (any range) and SmoothQuant per channel; not
    im2col SmoothQuant (research) nor the other activation sign (under --act-sign auto a non-negative
    input is unsigned already). Only these are scored at the model's outputs."""
    return key == "naive" or key.startswith("naive_") or key.startswith("sq_channel_")


@dataclass(frozen=True)
class Method:
    kind: str  # "fp" | "naive" | "smoothquant"
    alpha: float | None = None
    granularity: str | None = None
    mode: str | None = None
    calibrator: str | None = None  # naive: another activation range than the spec's (`p99.99`, `mse`)

    @classmethod
    def of(cls, rule: Any) -> Method:
        """The method a policy rule (`sensitivity.policy.Rule`), or a decided `LayerState`, describes."""
        if rule is None:
            return NAIVE
        if rule.method == "smoothquant":
            return cls("smoothquant", rule.alpha, rule.granularity, rule.mode or "static")
        calibrator = getattr(rule, "calibrator", None)
        if rule.method == "naive" and calibrator and calibrator != getattr(rule, "calibrator_default", None):
            return cls("naive", calibrator=calibrator)
        return FP if rule.method == "fp" else NAIVE

    @classmethod
    def from_key(cls, key: str, mode: str = "static") -> Method:
        """The method a candidate key names: `naive`, `naive_p99.99`, `sq_channel_0.5`, `fp`."""
        if key in ("fp", "naive"):
            return FP if key == "fp" else NAIVE
        if key.startswith("naive_"):
            return cls("naive", calibrator=key.removeprefix("naive_"))
        if key.startswith("sq_"):
            _, granularity, alpha = key.split("_", 2)
            return cls("smoothquant", float(alpha), granularity, mode)
        raise ValueError(f"not a method key: {key!r}")

    @property
    def key(self) -> str:
        """Its candidate / column name: `naive`, `sq_channel_0.5`, ..."""
        if self.kind == "smoothquant":
            assert self.granularity is not None and self.alpha is not None
            return sq_key(self.granularity, self.alpha)
        if self.kind == "naive" and self.calibrator:
            return f"naive_{self.calibrator}"
        return self.kind

    def fit(self, layer: QuantMixin, stats: LayerStats) -> LayerQuant:
        """The layer setting from calibration statistics (SmoothQuant: the factors and the smoothed input's
        max-calibrated amax, exactly from the per-channel maxima)."""
        if self.kind == "fp":
            return LayerQuant("fp")
        if self.kind == "naive":
            amax = stats.calibrator_amax(self.calibrator) if self.calibrator else stats.amax()
            return LayerQuant("naive", amax, stats.unsigned())
        assert self.alpha is not None
        if self.granularity == "im2col":
            raise ConfigError(
                "im2col SmoothQuant is research-only (no deployable form); use granularity channel"
            )
        if self.mode == "dynamic":
            return LayerQuant("smoothquant", None, False, None, self.alpha)
        if stats.chan_absmax is None:
            raise ConfigError("no per-channel statistics for SmoothQuant in the quant state")
        _, amax, _, scale = layer.smoothing_setting(stats.chan_absmax, self.alpha)
        return LayerQuant("smoothquant", amax, False, scale)

    def rule_fields(self) -> Mapping[str, Any]:
        """The policy rule's fields for this method (match, reason and metrics are the caller's)."""
        if self.kind == "naive" and self.calibrator:
            return {"method": "naive", "calibrator": self.calibrator}
        if self.kind != "smoothquant":
            return {"method": self.kind}
        return {
            "method": "smoothquant",
            "alpha": self.alpha,
            "granularity": self.granularity,
            "mode": self.mode,
        }


FP = Method("fp")
NAIVE = Method("naive")
