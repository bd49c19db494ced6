"""Exact output errors: a configuration of the quantized model run over the held-out batches against the FP
model's outputs, kept once.

What the output probes cannot predict is measured here: layers no gradient reaches (spconv on CPU, a
`.detach()` or `no_grad` in the model's forward), each quantized alone; and every policy the scan believes,
before it is believed. One configuration costs one quantized forward over the held-out batches (the FP
outputs are not recomputed). The benchmark's oracle measures every layer this way (L forwards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from sensitivity import distributed as D
from sensitivity.capture.kept import KeptOutputs
from sensitivity.capture.outputs import OutputEnergy, OutputSelector, sq_norm
from sensitivity.capture.passes import PassResult, Progress, quantized_pass
from sensitivity.capture.pieces import held_pieces
from sensitivity.capture.recorded import RecordedForward
from sensitivity.io.batches import Batch, batch_len, batch_to, run_checked
from sensitivity.prepare import LayerInfo
from sensitivity.quant.build import LayerQuant, configure_layers

__all__ = ["OutputReference", "ReferenceFromProbes"]


def _fp_names(configs: dict[str, LayerQuant]) -> set[str]:
    """The layers a configuration keeps in FP: those a pass may serve from kept FP outputs."""
    return {n for n, c in configs.items() if c.method == "fp"}


class OutputReference:
    """The FP model's selected outputs on the held-out pieces (this rank's shard), detached."""

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        pieces: Sequence[tuple[int, Batch]],
        select: OutputSelector,
        refs: Sequence[dict[str, torch.Tensor]],
        device: str | torch.device | None = None,
    ) -> None:
        """From the selected FP outputs of each piece (`refs`), computed already (`run` computes them)."""
        self.select, self.device, self.layers = select, device, list(layers)
        self.pieces = list(pieces)
        #: FP layer outputs an exact check may reuse (`keep_layer_outputs`), else None
        self.kept: KeptOutputs | None = None
        self.refs = list(refs)
        self.weights = [float(batch_len(piece) or 1) for _, piece in self.pieces]
        keys = sorted({k for ref in self.refs for k in ref})
        local = [sum(sq_norm(r[k]) for r in self.refs if k in r) for k in keys]
        self.energy = OutputEnergy(dict(zip(keys, D.sum_floats(*local), strict=True)))
        self.runs = 0

    @classmethod
    def run(
        cls,
        fp: nn.Module,
        layers: Sequence[LayerInfo],
        held: Sequence[Batch],
        select: OutputSelector,
        *,
        first_index: int = 0,
        device: str | torch.device | None = None,
        budget_mb: float = 128.0,
        copies: int = 1,
    ) -> OutputReference:
        """One FP forward over the held-out batches, cut into pieces within `budget_mb` for `copies` of each
        layer output: the pieces of every check and verification pass that follows (their kept FP outputs
        serve only a pass cut the same way)."""
        pieces = held_pieces(layers, held, budget_mb, first_index, copies)
        refs = []
        with torch.no_grad():
            for index, piece in pieces:
                batch = batch_to(piece, device) if device is not None else piece
                refs.append({k: v.detach() for k, v in select(run_checked(fp, batch, index)).items()})
        return cls(layers, pieces, select, refs, device)

    def measure(self, qmodel: nn.Module, configs: dict[str, LayerQuant]) -> float:
        """Relative output MSE (Σ over outputs of ‖Δy‖² / ‖y‖², both summed over the held-out batches) of
        `qmodel` configured with `configs`; inf where it turns non-finite. All ranks take part."""
        configure_layers(qmodel, configs)
        total, weight = 0.0, 0.0
        kept = self.kept if self.kept is not None else KeptOutputs([])
        fp_names = _fp_names(configs)
        with torch.no_grad(), kept.serving(qmodel, fp_names) as serving:
            for i, ((index, piece), ref, w) in enumerate(
                zip(self.pieces, self.refs, self.weights, strict=True)
            ):
                batch = batch_to(piece, self.device) if self.device is not None else piece
                serving.piece(i)
                total += self.energy.share(ref, self.select(run_checked(qmodel, batch, index)))
                weight += w
        self.runs += 1
        total, weight = D.sum_floats(total, weight)
        return total if weight > 0 else math.nan

    def keep_layer_outputs(self, fp: nn.Module, budget_mb: float) -> None:
        """Keep the FP outputs of the layers worth it (within `budget_mb`) for the measurements that follow:
        one FP forward now, then each measurement skips the FP layers whose input is the FP one."""
        if self.kept is None:
            samples = int(sum(self.weights)) or 1  # every piece's outputs are kept
            self.kept = KeptOutputs.record(fp, self.layers, self.pieces, samples, budget_mb, self.device)

    def drop_layer_outputs(self) -> None:
        self.kept = None

    def alone(self, qmodel: nn.Module, names: Sequence[str], layer: str, setting: LayerQuant) -> float:
        """`layer` quantized with `setting`, every other layer in FP."""
        configs = {n: LayerQuant("fp") for n in names}
        configs[layer] = setting
        return self.measure(qmodel, configs)

    def check(
        self, qmodel: nn.Module, layers: Sequence[LayerInfo], configs: dict[str, LayerQuant],
        progress: Progress | None = None,
    ) -> PassResult:  # fmt: skip
        """`qmodel` configured with `configs` against the kept FP outputs: the model-output errors and
        where it first turns non-finite (no per-layer errors: one quantized forward, no FP forward)."""
        configure_layers(qmodel, configs)
        pieces = [
            (index, piece, ref, w)
            for (index, piece), ref, w in zip(self.pieces, self.refs, self.weights, strict=True)
        ]
        kwargs = {"progress": progress} if progress is not None else {}
        fp_names = _fp_names(configs)
        result = quantized_pass(
            qmodel, layers, pieces, self.select, self.energy, self.device, kept=self.kept, fp_names=fp_names,
            **kwargs,
        )  # fmt: skip
        self.runs += 1
        return result


class ReferenceFromProbes:
    """The reference of held-out batches that are one piece, taken from the output probes' forward of that
    piece (`compare_pass(reference_from_probes=...)`): its selected outputs, and the FP layer outputs worth
    keeping (within `keep_mb`) from its recorded calls. A LiDAR scan with one held-out frame then runs
    neither the reference's FP forward nor the kept outputs' own (each a forward of the frame)."""

    def __init__(
        self, layers: Sequence[LayerInfo], pieces: Sequence[tuple[int, Batch]], select: OutputSelector,
        device: str | torch.device | None, keep_mb: float,
    ) -> None:  # fmt: skip
        self.layers, self.pieces, self.select = layers, pieces, select
        self.device, self.keep_mb = device, keep_mb
        self.reference: OutputReference | None = None

    def __call__(self, flat: dict[str, torch.Tensor], forward: RecordedForward | None) -> OutputEnergy:
        ref = OutputReference(self.layers, self.pieces, self.select, [flat], self.device)
        if forward is not None and self.keep_mb > 0 and forward.intact():
            samples = int(sum(ref.weights)) or 1
            ref.kept = KeptOutputs.of_calls(self.layers, forward.calls, samples, self.keep_mb)
        self.reference = ref
        return ref.energy
