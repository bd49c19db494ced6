"""Quantized passes over the held-out batches for a configuration, with the non-finite repair: what every
decision is checked with before it is believed."""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd
from torch import nn

from sensitivity import distributed as D
from sensitivity.capture.passes import PassResult, compare_pass
from sensitivity.capture.pieces import verify_copies
from sensitivity.io.batches import Batch
from sensitivity.pipeline.exact import OutputReference
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.policy import ExcludeEntry
from sensitivity.prepare import LayerInfo
from sensitivity.quant.build import LayerQuant, configure_layers

__all__ = ["Verifier", "isolated_badness", "repair_reason"]


def isolated_badness(table: pd.DataFrame, name: str) -> float:
    """Isolated error used to rank layers; non-finite isolated outputs rank first."""
    if table.loc[name, "iso_naive_nonfinite"] > 0:
        return math.inf
    value = float(table.loc[name, "iso_naive_rel_l1"])
    return value if math.isfinite(value) else -1.0


def repair_reason(table: pd.DataFrame, name: str, where: str) -> ExcludeEntry:
    """Why the repair put `name` in FP: the quantized model turned non-finite at `where`, and `name` had the
    worst isolated error upstream."""
    rel = float(table.loc[name, "iso_naive_rel_l1"])
    return ExcludeEntry(
        name,
        f"the quantized model turns non-finite at {where}; worst isolated error upstream (relative L1 {rel:.3g})",
        {"iso_naive_rel_l1": rel},
    )


class Verifier:
    """Runs `qmodel` configured one way against `fp` on the held-out batches (this rank's shard)."""

    def __init__(self, fp: nn.Module, qmodel: nn.Module, layers: list[LayerInfo], held: list[Batch],
                 opts: ScanOptions, progress: PhaseProgress,
                 reference: OutputReference | None = None, probes: int = 0) -> None:  # fmt: skip
        """`probes`: the measure stage's probes per piece; the passes are cut as `verify_copies` says, like
        the reference's pieces (whose kept FP outputs serve only a pass cut the same way)."""
        self.fp, self.qmodel, self.layers, self.held = fp, qmodel, layers, held
        self.copies = verify_copies(layers, opts.stored_activation_mb, probes)
        #: the kept FP outputs (with their energies: every pass is normalised by them), or None
        self.reference = reference
        self.opts, self.progress = opts, progress
        self.names = [layer.name for layer in layers]

    def run(self, configs: dict[str, LayerQuant], label: str, outputs_only: bool = False) -> PassResult:
        """A quantized pass for `configs`: against the FP pass (per-layer cumulative errors too), or with
        `outputs_only` and kept FP outputs, the quantized forward alone (what a check of the model's outputs
        and the non-finite repair need)."""
        if outputs_only and self.reference is not None:
            with self.progress.phase(f"verify {label}", len(self.held)) as advance:
                result = self.reference.check(self.qmodel, self.layers, configs, advance)
            D.reduce_pass_(result)
            return result
        configure_layers(self.qmodel, configs)
        with self.progress.phase(f"verify {label}", len(self.held)) as advance:
            result = compare_pass(
                self.fp, self.qmodel, self.layers, self.held, outputs=self.opts.output_selector,
                progress=advance, device=self.opts.device, stored_budget_mb=self.opts.stored_activation_mb,
                energy=self.reference.energy if self.reference is not None else None,
                kept=self.reference.kept if self.reference is not None else None, copies=self.copies,
            )  # fmt: skip
        D.reduce_pass_(result)
        return result

    def repaired(
        self,
        configs: dict[str, LayerQuant],
        label: str,
        badness: Callable[[str], float],
        reason: Callable[[str, str], ExcludeEntry],
        outputs_only: bool = False,
    ) -> tuple[PassResult, dict[str, ExcludeEntry]]:
        """Verify; while the model turns non-finite, put the worst layer (by `badness`) upstream of the
        first non-finite value in FP and retry. Bounded (a few steps, one quantized pass each). Returns the
        final check and the layers it moved, with `reason(layer, where)`. `configs` is updated in place."""
        check = self.run(configs, label, outputs_only)
        moved: dict[str, ExcludeEntry] = {}
        for _ in range(self.opts.max_nonfinite_repairs):
            if check.first_nonfinite is None:
                break
            quantized = [n for n in self.names if configs[n].method != "fp"]
            upstream = [n for n in check.nonfinite_upstream if configs[n].method != "fp"] or quantized
            if not upstream:
                break
            worst = max(upstream, key=badness)
            moved[worst] = reason(worst, check.first_nonfinite)
            configs[worst] = LayerQuant("fp")
            check = self.run(configs, label, outputs_only)
        return check, moved
