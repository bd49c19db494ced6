"""The toolkit's vocabulary (methods, granularities, modes, calibrators, metric names) and the quantization
spec (bit widths, activation sign, calibrator) parsed from strings like `W8A8`. Torch-free: the policy YAML
and the report read these names without loading torch."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal

from sensitivity.errors import SpecError

__all__ = [
    "CALIBRATORS",
    "CALIBRATOR_CHOICES",
    "GRANULARITIES",
    "METHODS",
    "METRICS",
    "MODES",
    "SPEC_RE",
    "QuantSpec",
    "calibrator_problem",
    "qrange",
    "spec_problem",
]

#: Per-layer methods a policy assigns.
METHODS = ("fp", "naive", "smoothquant")
#: SmoothQuant granularities: one factor per input channel (deployable) or per im2col column (research).
GRANULARITIES = ("channel", "im2col")
#: SmoothQuant modes: factors from calibration (deployable) or from each batch (research).
MODES = ("static", "dynamic")
CALIBRATORS = ("max", "percentile", "entropy", "mse")
#: The activation ranges a scan offers each layer, all computed from one histogram of its input (policy
#: `calibrator:` values): the maximum, three percentiles of |x|, and the range minimising the quantization
#: MSE. Entropy is left out: it is reported to clip away far-range LiDAR points, and it costs a KL search per
#: layer. See `calibrator_choice`.
CALIBRATOR_CHOICES = ("max", "p99.9", "p99.99", "p99.999", "mse")
#: Per-layer error metrics, in the column order of layers.csv (`{iso,cum}_{method}_{metric}`).
METRICS = ("l1", "rel_l1", "mse", "sqnr_db", "cosine", "max_abs", "nonfinite")
ActSign = Literal["signed", "auto"]
#: `W<bits>A<bits>` as a user types it on the command line (any case, surrounding blanks allowed).
SPEC_RE = re.compile(r"^\s*W(\d+)A(\d+)\s*$", re.IGNORECASE)
#: ... and as files (policy.yaml, exclude.yaml) hold it: exactly the form `QuantSpec.name` writes.
_WRITTEN_SPEC_RE = re.compile(r"^W(\d+)A(\d+)$")


def spec_problem(spec: object) -> str | None:
    """What is wrong with a spec as a file holds it (`W<bits>A<bits>`, bits in 2..16), or None."""
    match = _WRITTEN_SPEC_RE.match(spec) if isinstance(spec, str) else None
    # (a length check first: int() refuses strings of thousands of digits)
    if not match or not all(len(bits.lstrip("0")) <= 2 and 2 <= int(bits) <= 16 for bits in match.groups()):
        text = repr(spec)
        shown = text if len(text) <= 60 else text[:57] + "..."
        return f"spec must be of the form W<bits>A<bits> with bits in 2..16, e.g. W8A8; got {shown}"
    return None


def calibrator_problem(choice: object) -> str | None:
    """What is wrong with a per-layer calibrator choice (`max`, `mse`, `entropy`, `p<percentile>`), or None."""
    if choice in ("max", "mse", "entropy"):
        return None
    if isinstance(choice, str) and choice.startswith("p"):
        try:
            value = float(choice[1:])
        except ValueError:
            value = math.nan
        if 0.0 < value <= 100.0:
            return None
    return f"calibrator must be max, mse, entropy or p<percentile> (e.g. p99.99), got {choice!r}"


def qrange(num_bits: int, unsigned: bool) -> tuple[int, int]:
    """Integer code range, as ONNX QuantizeLinear saturates: int8 [-128, 127], uint8 [0, 255]."""
    if unsigned:
        return 0, 2**num_bits - 1
    return -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1


@dataclass(frozen=True)
class QuantSpec:
    """Symmetric quantization: weights per output channel, activations per tensor.

    scale = amax / qmax with qmax = 2^(b-1) - 1 (signed) or 2^b - 1 (unsigned). Activations are signed by
    default because TensorRT runs only signed int8; `act_sign="auto"` makes a layer's activation unsigned
    when its calibrated input is never negative (for uint8 backends).
    """

    w_bits: int = 8
    a_bits: int = 8
    act_sign: ActSign = "signed"
    calibrator: str = "max"
    percentile: float = 99.99
    num_bins: int = 2048

    def __post_init__(self) -> None:
        for what, bits in (("weight", self.w_bits), ("activation", self.a_bits)):
            if not isinstance(bits, int) or not 2 <= bits <= 16:
                raise SpecError(f"{what} bits must be an integer in 2..16, got {bits!r}")
        if self.act_sign not in ("signed", "auto"):
            raise SpecError(f"act_sign must be 'signed' or 'auto', got {self.act_sign!r}")
        if self.calibrator not in CALIBRATORS:
            raise SpecError(f"unknown calibrator {self.calibrator!r}; choose one of {', '.join(CALIBRATORS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise SpecError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.num_bins < 16:
            raise SpecError(f"num_bins must be at least 16, got {self.num_bins!r}")

    @classmethod
    def parse(cls, text: str, **options: object) -> QuantSpec:
        """`W8A8`, `W4A8`, `w8a16` ... plus keyword options (act_sign, calibrator, percentile)."""
        match = SPEC_RE.match(str(text))
        if not match:
            raise SpecError(
                f"cannot parse quantization spec {text!r}: expected the form W<bits>A<bits>, e.g. W8A8"
            )
        try:
            w_bits, a_bits = int(match.group(1)), int(match.group(2))
        except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
            raise SpecError(
                f"cannot parse quantization spec {text!r}: expected the form W<bits>A<bits>, e.g. W8A8"
            ) from None
        return cls(w_bits=w_bits, a_bits=a_bits, **options)  # type: ignore[arg-type]

    @property
    def name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def calibrator_choice(self) -> str:
        """This spec's own calibrator as a per-layer choice name: `max`, `p99.99`, `mse`, `entropy`."""
        if self.calibrator == "percentile":
            return f"p{self.percentile:g}"
        return self.calibrator

    def with_options(self, **changes: object) -> QuantSpec:
        return replace(self, **changes)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, object]:
        return {
            "spec": self.name,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "act_sign": self.act_sign,
            "calibrator": self.calibrator,
            "percentile": self.percentile,
            "num_bins": self.num_bins,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> QuantSpec:
        keys = ("w_bits", "a_bits", "act_sign", "calibrator", "percentile", "num_bins")
        return cls(**{k: data[k] for k in keys if k in data})  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.name
