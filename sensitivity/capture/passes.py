"""The scan's comparison passes over the held-out batches: FP (+ isolated candidates), quantized (cumulative).

Per batch, the FP pass keeps each target layer's output only until the quantized pass of the same batch
has compared against it, so memory grows with one batch's activations, never with the number of batches.
Isolated errors are computed inside the FP pass's hooks (the layer alone quantized, on its FP input), so
they cost one extra layer call per candidate, not one extra model forward per layer.
"""

from __future__ import annotations

import functools
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from sensitivity.capture.hooks import LayerInputs, forward_hooks, layer_inputs
from sensitivity.capture.kept import KeptOutputs, Serving
from sensitivity.capture.nonfinite import NonfiniteWatch, leaf_names
from sensitivity.capture.observe import LayerObserver, RangeHistogram
from sensitivity.capture.outputs import (
    OutputEnergy,
    OutputSelector,
    as_tensor,
    check_fp_outputs,
    relative_sq_error,
)
from sensitivity.capture.pass_result import PassResult
from sensitivity.capture.pieces import held_pieces, over_budget, probe_pieces, split_copies
from sensitivity.capture.probe_signs import ProbeSigns
from sensitivity.capture.probes import OnForward, ProbeGrads, probe_gradients
from sensitivity.capture.recorded import RecordedForward, recomputable, release_graph_
from sensitivity.capture.split_grads import GradParts, SplitGrads, grad_absmax, grad_dots, lines_up
from sensitivity.io.batches import Batch, batch_len, batch_to, run_checked
from sensitivity.methods.base import Candidate, deployable
from sensitivity.methods.ranges import InputVariants
from sensitivity.metrics import reference_sums
from sensitivity.prepare import LayerInfo

__all__ = ["PassResult", "Progress", "compare_pass", "quantized_pass"]

Progress = Callable[[], None]


def _noop() -> None:
    return None


class _Compare:
    """One comparison pass's hooks and accumulators (see `compare_pass`)."""

    def __init__(
        self, res: PassResult, names: list[str], candidates: dict[str, dict[str, Candidate]],
        observers: dict[str, LayerObserver] | None, histograms: dict[str, RangeHistogram] | None,
        variants: dict[str, InputVariants],
    ) -> None:  # fmt: skip
        self.res, self.names, self.candidates = res, names, candidates
        self.observers, self.histograms, self.variants = observers, histograms, variants
        self.stored: dict[str, deque[torch.Tensor]] = defaultdict(deque)
        self.inputs: Callable[[str, tuple], torch.Tensor | None] = LayerInputs({})
        #: the outputs fp_hook sees are the pass's own (a replayed forward's): stored without a copy
        self.private = False
        self.watch = NonfiniteWatch()
        #: this piece's probe gradients, and the probe dot products summed over each layer's calls
        self.grads: ProbeGrads | SplitGrads | None = None
        #: whether pieces probed in parts lined up along dim 0 (None: none probed yet; False: they did not,
        #: and the parts run as pieces of their own from then on; see `probe_parts`)
        self.split: bool | None = None
        self.dots: dict[tuple[str, str], torch.Tensor] = {}
        self.energy: OutputEnergy | None = None
        #: the FP forward's kept layer outputs, where it is served from them
        self.serving: Serving | None = None
        #: layers whose op input / output the model writes into after the call (learned; see `compare_pass`)
        self.written: set[str] = set()
        self.out_written: set[str] | None = None
        #: layers whose output the probes' recorded forward does not keep (the replay recomputes it)
        self.recompute: frozenset[str] = frozenset()

    def probe(
        self, fp_model: nn.Module, batch: Batch, index: int, select: OutputSelector, probes: int, seed: int,
        on_forward: OnForward | None,
    ) -> RecordedForward | None:  # fmt: skip
        """This piece's probe gradients (for `fp_hook`) and its recorded forward."""
        self.grads = probe_gradients(
            fp_model, batch, self.names, select, probes, ProbeSigns(seed, batch), index, self.energy,
            record=True, written=self.written, on_forward=on_forward, out_written=self.out_written,
            variants=self.variants, recompute=self.recompute,
        )  # fmt: skip
        recorded, self.grads.forward = self.grads.forward, None
        return recorded

    def probe_parts(
        self, fp_model: nn.Module, parts: list[Batch], index: int, select: OutputSelector, probes: int, seed: int
    ) -> bool:  # fmt: skip
        """The probes of a piece run part by part (each part's autograd forward alone fits the budget), for
        one FP pass over the whole piece (`SplitGrads`); False where the parts' gradients do not line up
        along dim 0 (the caller then runs the parts as pieces of their own, and so do later pieces)."""
        grads = []
        for part in parts:
            got = probe_gradients(
                fp_model, part, self.names, select, probes, ProbeSigns(seed, part), index, self.energy,
                written=self.written, out_written=self.out_written, variants=self.variants,
            )  # fmt: skip
            if not lines_up(got):
                self.split = False
                return False
            grads.append(got)
        self.split, self.grads = True, SplitGrads(grads)
        return True

    def normalised_by(self, source: OnForward) -> OnForward:
        """`source`, whose energies then normalise this pass too."""

        def on_forward(flat: dict[str, torch.Tensor], forward: RecordedForward | None) -> OutputEnergy | None:
            self.energy = source(flat, forward)
            self.res.energy_normalised = self.energy is not None
            return self.energy

        return on_forward

    def fp_hook(self, name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        x = self.inputs(name, args)  # read on every call: a wrapped layer's op input is let go then
        y = as_tensor(out)
        if y is None:
            return
        if x is not None and self.observers is not None:
            self.observers[name].observe(x)
        if x is not None and self.histograms is not None:
            self.histograms[name].update(x)
        del x
        g_out = self.grads.take(name)[0] if self.grads is not None else None
        v_dots = self.grads.take_dots(name) if self.grads is not None else None
        if g_out is not None and self.res.grad_max[name] <= 0.0:  # once positive, the layer is not blind
            self.res.grad_max[name] = max(self.res.grad_max[name], grad_absmax(g_out))
        cands = self.candidates.get(name, {})
        sums = reference_sums(y) if cands else None
        naive: list[torch.Tensor] = []
        for cname, fn in cands.items():
            yc = as_tensor(fn(args))
            if yc is None:  # the candidate's output is ours: its memory holds the difference
                continue
            on_diff = None
            # scored at the outputs only where a policy may pick it
            if g_out is not None and deployable(cname):
                on_diff = functools.partial(self._probe_diff, name, cname, g_out, y.shape, naive)
            self.res.iso[(name, cname)].update(y, yc, ref_sums=sums, consume_test=True, on_diff=on_diff)
        if v_dots is not None and naive:  # the input variants, dotted in the probes' backward
            for keys, d in v_dots:
                dots = naive[0] if d is None else naive[0] + d
                for key in keys:
                    self._add_dots(name, key, dots)
        kept = self.serving.pristine(name) if self.serving is not None else None
        self.stored[name].append(
            kept if kept is not None else y.detach() if self.private else y.detach().clone()
        )

    def compare(
        self, fp_model: nn.Module, q_model: nn.Module, batch: Batch, index: int,
        recorded: RecordedForward | None, leaves: list[str], select: OutputSelector,
    ) -> None:  # fmt: skip
        """One piece: the FP pass (the probes' recorded forward replayed, else a forward with hooks), then
        the quantized pass against it and the model-output errors."""
        if recorded is not None and recorded.intact() and release_graph_(fp_model):
            fp_out = self.replay(recorded)
        else:  # no probes or probed in parts, the model wrote into a layer's input or output, or kept
            # autograd tensors in a container that could not be changed
            with (
                layer_inputs(fp_model, self.names) as inputs,
                forward_hooks(fp_model, self.names, self.fp_hook),
            ):
                self.inputs = inputs
                fp_out = run_checked(fp_model, batch, index)
        check_fp_outputs(fp_out, index)
        weight = float(batch_len(batch) or 1)
        self.finish_piece(weight)
        self.watch.reset()
        with (
            forward_hooks(q_model, self.names, self.q_hook),
            forward_hooks(q_model, leaves, self.watch.leaf_hook),
        ):
            q_out = run_checked(q_model, batch, index)
        self.outputs(select(fp_out), select(q_out), weight)

    def replay(self, forward: RecordedForward) -> Any:
        """`fp_hook` on every call of the probes' recorded forward, in call order, instead of a second
        forward; returns the model's output. Each call is let go once replayed (its input is needed no
        longer unless kept elsewhere; its output lives on in `stored` until the quantized pass)."""
        self.private = True
        calls, forward.calls = forward.calls[::-1], []
        try:
            while calls:
                call = calls.pop()
                self.inputs = lambda name, args, _x=call.x: _x
                self.fp_hook(call.name, call.module, call.args, call.output())
                del call
        finally:
            self.private, self.inputs = False, LayerInputs({})
        return forward.output

    def _probe_diff(
        self, name: str, cname: str, g: torch.Tensor | GradParts, shape: torch.Size, naive: list[torch.Tensor],
        diff: torch.Tensor,
    ) -> None:  # fmt: skip
        assert self.grads is not None
        dots = grad_dots(g, diff.view(shape), self.grads.samples)
        self._add_dots(name, cname, dots)
        if cname == "naive":
            naive.append(dots)

    def _add_dots(self, name: str, cand: str, dots: torch.Tensor) -> None:
        key = (name, cand)
        prev = self.dots.get(key)
        self.dots[key] = dots if prev is None else prev + dots

    def finish_piece(self, weight: float) -> None:
        """Square this piece's probe dot products (per probe and sample, summed over a layer's calls)."""
        if self.grads is None:
            return
        for key, dots in self.dots.items():
            self.res.pred[key] += self._weighted_squares(dots, weight) / self.grads.probes
        self.res.pred_weight += weight
        if self.grads.failed:
            self.res.probe_failed = self.grads.failed
        self.dots.clear()
        self.grads = None

    def _weighted_squares(self, dots: torch.Tensor, weight: float) -> float:
        """Σ dots² of a piece: as it is under one `OutputEnergy` (E_o normalised the probes already), else
        weighted by the samples of each piece whose own ‖y_o‖ normalised its probes (a piece probed in
        parts: each part, one column of `dots` per sample)."""
        if self.res.energy_normalised:
            return float((dots**2).sum())
        if not isinstance(self.grads, SplitGrads):
            return weight * float((dots**2).sum())
        total, start = 0.0, 0
        for n in self.grads.sizes:
            total += n * float((dots[:, start : start + n] ** 2).sum())
            start += n
        return total

    def q_hook(self, name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        y = as_tensor(out)
        queue = self.stored.get(name)
        if y is None or not queue:
            return
        self.res.cum[name].update(queue.popleft(), y)
        self.res.calls[name] += 1
        self.watch.called.append(name)

    def outputs(
        self, ref_flat: dict[str, torch.Tensor], q_flat: dict[str, torch.Tensor], weight: float
    ) -> None:
        """Model-output errors per named output (selected), and the first non-finite value of the piece."""
        rel = 0.0
        for key, ref in ref_flat.items():
            if key in q_flat:
                self.res.out[key].update(ref, q_flat[key])
                if self.energy is None:
                    rel += relative_sq_error(ref, q_flat[key])
        if self.energy is not None:
            self.res.out_rel += self.energy.share(ref_flat, q_flat)
        else:
            self.res.out_rel += weight * rel
        self.res.out_weight += weight
        found = self.watch.found(q_flat)
        if found is not None and (
            self.res.first_nonfinite is None or found[0] < self.res.first_nonfinite_rank
        ):
            self.res.first_nonfinite_rank, self.res.first_nonfinite = found[0], found[1]
            self.res.nonfinite_upstream = list(found[2])
        self.stored.clear()


def compare_pass(
    fp_model: nn.Module,
    q_model: nn.Module,
    layers: Sequence[LayerInfo],
    batches: Sequence[Batch],
    *,
    candidates: dict[str, dict[str, Candidate]] | None = None,
    variants: dict[str, InputVariants] | None = None,
    observers: dict[str, LayerObserver] | None = None,
    histograms: dict[str, RangeHistogram] | None = None,
    outputs: OutputSelector | None = None,
    progress: Progress = _noop,
    first_index: int = 0,
    result: PassResult | None = None,
    device: torch.device | str | None = None,
    stored_budget_mb: float = 128.0,
    probes: int = 0,
    seed: int = 0,
    energy: OutputEnergy | None = None,
    kept: KeptOutputs | None = None,
    reference_from_probes: OnForward | None = None,
    written_outputs: set[str] | None = None,
    copies: int | None = None,
) -> PassResult:
    """Per batch: FP pass (isolated candidates, observers) then quantized pass (cumulative vs FP). With
    `probes` > 0 each piece first gets that many output probes (`probe_gradients`), and every candidate's
    isolated error (and every input variant's) is dotted with them: `PassResult.pred`. `kept`: FP layer
    outputs kept on the same pieces, which the FP forward returns instead of recomputing them.
    `reference_from_probes` (with probes, where the held-out batches are one piece): gets that piece's
    selected FP outputs and recorded forward from the probes' forward (so the caller's reference needs no
    forward of its own) and returns the energies that normalise the probes and the output errors.
    `written_outputs`: the layers whose output the model writes into after the call (the dataflow says
    which): the probes' forward copies only their outputs (None: every output), and learns any other it
    finds written. `copies`: of each layer output a piece is sized for, at least what this pass holds (the
    FP outputs and the probes' gradients); a verification pass gives `pieces.verify_copies`, so that its
    pieces are no larger than the measure stage's where that keeps the scan's peak down."""
    res = result if result is not None else PassResult()
    names = [layer.name for layer in layers]
    run = _Compare(res, names, candidates or {}, observers, histograms, variants or {})
    run.energy, res.energy_normalised = energy, energy is not None
    select = outputs or OutputSelector()
    leaves = leaf_names(q_model, set(names))
    run.out_written = set(written_outputs) if written_outputs is not None else None
    pure_forward = frozenset(n for n in names if recomputable(fp_model.get_submodule(n)))
    pure = not (probes or candidates or observers or histograms or variants)  # no per-layer work on inputs
    kept = kept if kept is not None and pure else KeptOutputs([])
    with torch.no_grad(), kept.serving(fp_model, set(names)) as serving:
        last_index = first_index - 1
        # with probes: pieces sized for the FP outputs and the gradients, probed in parts where needed
        copies = max(copies or 1, split_copies(probes))
        pieces = held_pieces(layers, batches, stored_budget_mb, first_index, copies)
        run.serving = serving
        for position, (index, batch) in enumerate(pieces):
            serving.piece(position)
            if device is not None:
                batch = batch_to(batch, device)
            source = reference_from_probes if position == 0 else None
            parts = probe_pieces(layers, batch, stored_budget_mb, probes) if probes else [batch]
            units = [(part, False) for part in parts]
            split = len(parts) > 1 and source is None and run.split is not False
            if split and run.probe_parts(fp_model, parts, index, select, probes, seed):
                units = [(batch, True)]
            for unit, probed in units:
                recorded = None
                if probes and not probed:
                    # a piece whose outputs alone exceed the budget (a LiDAR frame) records fewer of them
                    run.recompute = (
                        pure_forward if over_budget(layers, unit, stored_budget_mb) else frozenset()
                    )
                    on_forward = run.normalised_by(source) if source is not None else None
                    recorded = run.probe(fp_model, unit, index, select, probes, seed, on_forward)
                    source = None  # the first piece's forward gives the reference
                run.compare(fp_model, q_model, unit, index, recorded, leaves, select)
                del recorded
            if index != last_index:
                last_index = index
                progress()
    return res


def quantized_pass(
    q_model: nn.Module,
    layers: Sequence[LayerInfo],
    pieces: Sequence[tuple[int, Batch, dict[str, torch.Tensor], float]],
    select: OutputSelector,
    energy: OutputEnergy | None = None,
    device: torch.device | str | None = None,
    progress: Progress = _noop,
    kept: KeptOutputs | None = None,
    fp_names: set[str] | None = None,
) -> PassResult:
    """The quantized model alone against FP outputs kept from an earlier pass ((batch index, piece, selected
    FP outputs, weight) per piece): the model-output errors and where it first turns non-finite, without
    the FP forward or the per-layer cumulative errors (a configuration that only needs checking). `kept`:
    FP layer outputs on the same pieces, for the layers in FP (`fp_names`) whose input is the FP one."""
    res = PassResult()
    names = [layer.name for layer in layers]
    run = _Compare(res, names, {}, None, None, {})
    run.energy, res.energy_normalised = energy, energy is not None

    def called(name: str, mod: nn.Module, args: tuple, out: Any) -> None:
        run.watch.called.append(name)

    last_index = None
    kept = kept if kept is not None else KeptOutputs([])
    with (
        torch.no_grad(),
        kept.serving(q_model, fp_names or set()) as serving,
        forward_hooks(q_model, names, called),
        forward_hooks(q_model, leaf_names(q_model, set(names)), run.watch.leaf_hook),
    ):
        for position, (index, piece, ref_flat, weight) in enumerate(pieces):
            batch = batch_to(piece, device) if device is not None else piece
            serving.piece(position)
            run.watch.reset()
            run.outputs(ref_flat, select(run_checked(q_model, batch, index)), weight)
            if index != last_index:
                last_index = index
                progress()
    return res
