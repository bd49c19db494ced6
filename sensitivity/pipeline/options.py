"""What a scan is asked to do (`ScanOptions`, frozen) and how it reports progress (`PhaseProgress`)."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.pieces import probes_that_fit
from sensitivity.errors import SpecError
from sensitivity.policy import DEFAULT_SQ_MARGIN, Thresholds, glob_match
from sensitivity.prepare import Selection
from sensitivity.spec import GRANULARITIES, MODES, QuantSpec

__all__ = ["DEFAULT_ALPHAS", "MAX_AUTO_PROBES", "POLICIES", "PROBE_SAMPLES", "PhaseProgress", "ScanOptions"]

log = logging.getLogger(__name__)

#: Default SmoothQuant alpha: the notes' stable 0.5, one candidate per layer. Measured against a 3-alpha
#: grid on seven real trained models (benchmarks/alpha_grid.py): the grid's verified policy had the lower
#: test output error on three, the higher on four (RNet 2.9x higher), for up to 1.25x the scan time; each
#: extra alpha is one more layer call per layer on the held-out batches.
#: `--alpha-grid 0.25,0.5,0.75` or `0.1:0.9:0.1` sweep.
DEFAULT_ALPHAS = (0.5,)
#: Output probes: one probe on one sample is one estimate of a layer's output error (relative spread about
#: 1.4); by default a scan uses enough probes for this many per layer, at least one and at most
#: `MAX_AUTO_PROBES` per piece (each costs one backward pass over the held-out batches). Measured in
#: benchmarks/output_sensitivity.py: 4-16 probe-samples ranked the layers against the exact one-at-a-time
#: answer with Spearman 0.91-1.0 on seven real models (YOLOv8n 0.91 at 1 x 8, against 0.95 / 0.97 at 2 / 4 x 8;
#: the CenterPoint-shaped model 0.91 at 2 x 2, 0.94 at 4 x 2), and the verified policy's test error stayed
#: within 10% of the oracle's or better on all of them at seed 0, because the exact checks at the budget's
#: edge correct the ranking (CenterPoint-shaped: 1.03x the oracle's at 2 x 2, 1.09x at 4 x 2; a
#: CenterPoint-shaped model trained on another machine: 1.23x, then 0.79x once FP slots went by naive error).
#: Over 7 seeds (`--seeds`): within 10% at the median on all seven, up to 1.4x on single draws, from the other
#: candidates on small held-out sets (benchmarks/README.md, "The probes' signs per sample"). More probe-samples only
#: cost: YOLOv8n's whole scan took 1.8x as long with 32, the CenterPoint-shaped one's scores 1.19-1.44x its
#: scan without them at 2 x 2, 1.68-1.74x at 4 x 2. Few held-out samples get more than one probe each.
PROBE_SAMPLES = 4
MAX_AUTO_PROBES = 4
POLICIES = ("output", "thresholds")


class PhaseProgress:
    """Progress callbacks; the library reports phases, the CLI draws them (the library never prints)."""

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None

    def note(self, message: str) -> None:
        log.info(message)


@dataclass(frozen=True)
class ScanOptions:
    spec: QuantSpec = field(default_factory=QuantSpec)
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    fold_bn: bool = True
    holdout: float = 0.25
    thresholds: Thresholds = field(default_factory=Thresholds)
    exclude: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    seed: int = 0
    max_nonfinite_repairs: int = 8
    #: SmoothQuant: alphas to try (empty = off), granularities ("channel", research "im2col"), mode
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    granularities: tuple[str, ...] = ("channel",)
    sq_mode: str = "static"
    sq_margin: float = DEFAULT_SQ_MARGIN
    #: with an `evaluate` function: the metric key to budget on (default: the first returned) and the
    #: allowed drop from FP (same units as the metric); None = no greedy exclusion
    eval_metric: str | None = None
    exclude_budget: float | None = None
    #: where the passes run ("cpu", "cuda", "cuda:1"); batches are moved there one at a time
    device: str = "cpu"
    #: held-out batches are scanned in pieces whose stored FP outputs fit this many MiB (tensor batches of
    #: per-sample models: the same errors and output probes' estimates up to float rounding, the probes'
    #: random signs being drawn per sample; bounded memory); 0 = whole batches
    #: (`--stored-mb`). Larger pieces cost less per sample: on the edge shapes of benchmarks/edge_speed.py,
    #: 512 MiB ran 12-28% faster in process and took the peak to 2.0-2.9x a plain forward's; 128 kept it
    #: within 2x (benchmarks/README.md, "Memory for time")
    stored_activation_mb: float = 128.0
    #: `output -> {name: tensor}`: what the model's outputs are (instead of `outputs` keys), each measured apart
    output_fn: Callable[[Any], Any] | None = None
    #: output-referred sensitivity: random output probes per held-out batch piece (None: enough for about
    #: `PROBE_SAMPLES` probe-samples, 1..4; 0: off, and the policy falls back to isolated thresholds)
    probes: int | None = None
    #: offer each layer every `CALIBRATOR_CHOICES` range (one histogram of its input per calibration pass)
    calibrator_choices: bool = True
    #: "output": policy v2 (least predicted output error under the FP budget, verified on held-out
    #: batches); "thresholds": policy v1 (isolated-error thresholds)
    policy: str = "output"
    #: the FP budget of policy v2: at most this many layers (None: max(1, ceil(0.1 L))) and, if set, this
    #: fraction of the model's MACs; layers the NaN/Inf safety net keeps in FP do not count
    max_fp_layers: int | None = None
    max_fp_macs: float | None = None

    def __post_init__(self) -> None:
        bad = [g for g in self.granularities if g not in GRANULARITIES]
        if bad:
            raise SpecError(
                f"unknown SmoothQuant granularity {bad[0]!r}; choose from {', '.join(GRANULARITIES)}"
            )
        if self.sq_mode not in MODES:
            raise SpecError(f"unknown SmoothQuant mode {self.sq_mode!r}; choose static or dynamic")
        if not 0.0 < self.holdout < 1.0:
            raise SpecError(f"--holdout must be in (0, 1), got {self.holdout}")
        if not 0.0 < self.sq_margin <= 1.0:
            raise SpecError(f"SmoothQuant margin must be in (0, 1], got {self.sq_margin}")
        if self.policy not in POLICIES:
            raise SpecError(f"unknown policy {self.policy!r}; choose {' or '.join(POLICIES)}")
        if self.probes is not None and (isinstance(self.probes, bool) or not 0 <= self.probes <= 64):
            raise SpecError(f"--probes must be an integer in 0..64, got {self.probes!r}")
        if self.max_fp_layers is not None and (
            isinstance(self.max_fp_layers, bool) or self.max_fp_layers < 0
        ):
            raise SpecError(f"--max-fp-layers must be a non-negative integer, got {self.max_fp_layers!r}")
        mb = self.stored_activation_mb
        if isinstance(mb, bool) or not isinstance(mb, numbers.Real) or not 0.0 <= mb < math.inf:
            raise SpecError(f"--stored-mb must be a number of MiB >= 0 (0: whole batches), got {mb!r}")
        if self.max_fp_macs is not None and not 0.0 <= self.max_fp_macs <= 1.0:
            raise SpecError(f"--max-fp-macs must be a fraction in [0, 1], got {self.max_fp_macs!r}")

    def probe_count(self, samples: int, sample_mb: float = 0.0) -> int:
        """Probes per piece for `samples` held-out samples (all ranks'): `probes`, or the automatic count.
        The automatic count also keeps a piece within `stored_activation_mb` (`sample_mb`: one sample's
        layer outputs): a piece is never cut below one sample, and each probe holds another copy of its
        activations, so a sample too large for several copies (a LiDAR frame: 0.5 GiB on OpenPCDet's
        CenterPoint, where 4 probes took the scan's peak from 4.0 to 6.1 GiB) gets one probe."""
        if self.probes is not None:
            return self.probes
        count = min(MAX_AUTO_PROBES, math.ceil(PROBE_SAMPLES / max(samples, 1)))
        if sample_mb > 0 and self.stored_activation_mb > 0:
            count = min(count, probes_that_fit(self.stored_activation_mb, sample_mb))
        return max(1, count)

    def fp_layer_budget(self, n_layers: int) -> int:
        """At most how many layers policy v2 keeps in FP (the NaN/Inf safety net's not counted)."""
        if self.max_fp_layers is not None:
            return min(self.max_fp_layers, n_layers)
        return min(n_layers, max(1, math.ceil(0.1 * n_layers)))

    @property
    def output_selector(self) -> OutputSelector:
        return OutputSelector(tuple(self.outputs), self.output_fn)

    @property
    def selection(self) -> Selection:
        """`--only` / `--skip` as the layer selection `prepare` takes: why a layer is left out, or None."""
        only, skip = self.only, self.skip

        def select(name: str) -> str | None:
            if skip and any(glob_match(p, name) for p in skip):
                return "matched --skip"
            if only and not any(glob_match(p, name) for p in only):
                return "not in --only"
            return None

        return select

    def user_fp(self, names: list[str]) -> list[str]:
        """The layers the user's exclusion file keeps in FP (globs allowed)."""
        return [n for n in names if any(glob_match(p, n) for p in self.exclude)]
