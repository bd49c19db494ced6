"""Stage 1: the FP reference prepared and every layer's input calibrated on the fitting batches.

Decisions are scored on held-out batches, so quantizers are fitted on the rest (`split_holdout`); the
held-out batches feed the observers later too, so the final amax values use all of them. Under torchrun each
rank calibrates its shard and the statistics are all-reduced. A finished calibration is checkpointed beside
the report folder, and `--resume` reuses it when model, data and options match.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensitivity import distributed as D
from sensitivity.capture.calibrate import calibrate
from sensitivity.capture.observe import LayerObserver, channel_dim
from sensitivity.io.batches import Batch, split_holdout
from sensitivity.methods.im2col import im2col_refusal
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.prepare import Prepared, prepare
from sensitivity.quant.build import ActQuant, LayerQuant
from sensitivity.resume import fingerprint, load_calibration_checkpoint, save_calibration_checkpoint
from sensitivity.spec import QuantSpec

__all__ = ["Calibration", "calibrate_stage", "checkpoint_amax", "observers_for"]


@dataclass
class Calibration:
    """The prepared FP model, the batch split (and this rank's shard of it), and the calibrated inputs."""

    prep: Prepared
    batches: list[Batch]
    fit: list[Batch]
    held: list[Batch]
    fit_local: list[Batch]
    held_local: list[Batch]
    observers: dict[str, LayerObserver]
    #: a loaded checkpoint's own input amax (pytorch-quantization `_amax`): used instead of calibrating
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return self.prep.names

    @property
    def fit_only(self) -> bool:
        """The held-out batches were not used for fitting (so they may feed the observers afterwards)."""
        return len(self.fit) + len(self.held) == len(self.batches) and len(self.batches) > 1

    def acts(self) -> dict[str, ActQuant]:
        """Each layer's activation quantizer from the fitting batches."""
        return {
            n: ActQuant(self.fixed[n], False) if n in self.fixed else ActQuant(o.amax(), o.unsigned())
            for n, o in self.observers.items()
        }

    def fit_configs(self) -> dict[str, LayerQuant]:
        """Every layer naive with its fitting-batch quantizer (what the held-out scoring measured)."""
        return {n: LayerQuant("naive", a.amax, a.unsigned) for n, a in self.acts().items()}


def observers_for(
    fp: nn.Module,
    names: list[str],
    spec: QuantSpec,
    opts: ScanOptions,
    hist_range: dict[str, float] | None = None,
    choices: bool | None = None,
) -> dict[str, LayerObserver]:
    """Fresh observers; im2col column statistics only where the research im2col path will be scored."""
    ranges = hist_range or {}
    obs = {
        n: LayerObserver(
            spec,
            channel_dim(fp.get_submodule(n)),
            hist_range=ranges.get(n),
            # the ranges are scored by the output probes only: none without them
            choices=(opts.calibrator_choices and opts.probes != 0) if choices is None else choices,
        )
        for n in names
    }
    if "im2col" in opts.granularities and opts.alphas and opts.sq_mode == "static":
        for n in names:
            mod = fp.get_submodule(n)
            if im2col_refusal(mod) is None:
                obs[n].col_module = mod
    return obs


def checkpoint_amax(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Input amax a loaded checkpoint already carries (a pytorch-quantization model's `_input_quantizer._amax`,
    read by `sensitivity.load`): used instead of recalibrating those layers."""
    found = getattr(model, "sensitivity_checkpoint_amax", None) or {}
    return {
        n: torch.as_tensor(found[n]["input"]).float().reshape(())
        for n in names
        if n in found and "input" in found[n]
    }


def _calibrated(
    fp: nn.Module, prep: Prepared, fit_local: list[Batch], opts: ScanOptions, progress: PhaseProgress
) -> dict[str, LayerObserver]:
    spec, names, layers = opts.spec, prep.names, prep.layers
    observers = observers_for(fp, names, spec, opts)
    if D.is_distributed() and (spec.calibrator != "max" or opts.calibrator_choices):
        # histograms add up across ranks only over one fixed range: a max pass first (distributed.py)
        ranges = observers_for(fp, names, spec.with_options(calibrator="max"), opts, choices=False)
        with progress.phase("calibrate (range)", len(fit_local)) as advance:
            calibrate(fp, layers, fit_local, spec, progress=advance, observers=ranges, device=opts.device)
        D.reduce_observers_(ranges)
        observers = observers_for(fp, names, spec, opts, {n: ranges[n].max_abs for n in names})
    with progress.phase("calibrate", len(fit_local)) as advance:
        calibrate(fp, layers, fit_local, spec, progress=advance, observers=observers, device=opts.device,
                  outputs=opts.output_selector)  # fmt: skip
    D.reduce_observers_(observers)
    return observers


def calibrate_stage(
    model: nn.Module,
    batches: Sequence[Batch],
    opts: ScanOptions,
    progress: PhaseProgress,
    timings: dict[str, float],
    on_prepared: Callable[[nn.Module], Any] | None = None,
    resume_file: Path | None = None,
    resume: bool = False,
) -> Calibration:
    """Prepare (deepcopy, fold BN, order layers), then calibrate on the fitting batches (or resume).
    `on_prepared(fp)` runs right after preparing (the user's metric on the FP model: a broken --eval
    fails in seconds, before any calibration work)."""
    t0 = time.perf_counter()
    batches = list(batches)
    with progress.phase("prepare", 1) as advance:
        prep = prepare(model, batches[0], select=opts.selection, fold_bn=opts.fold_bn, device=opts.device)
        advance()
    if on_prepared is not None:
        on_prepared(prep.model)
    fit, held = split_holdout(batches, opts.holdout)
    timings["prepare_s"] = time.perf_counter() - t0
    fit_local, held_local = D.shard(fit), D.shard(held)  # torchrun: this rank's shard of each list
    t = time.perf_counter()
    names = prep.names
    key = fingerprint(prep.model, batches, opts) if resume_file is not None else ""
    observers = None
    if resume:
        new = lambda ranges=None: observers_for(prep.model, names, opts.spec, opts, ranges)  # noqa: E731
        observers = load_calibration_checkpoint(resume_file, key, new, prep.layers)
        progress.note(f"resumed: calibration of {len(fit)} batches loaded from {resume_file}")
    else:
        observers = _calibrated(prep.model, prep, fit_local, opts, progress)
        if resume_file is not None and D.is_main():
            save_calibration_checkpoint(resume_file, key, observers, prep.layers)
    timings["calibrate_s"] = time.perf_counter() - t
    return Calibration(
        prep, batches, fit, held, fit_local, held_local, observers, checkpoint_amax(model, names)
    )
