"""Output probes: every layer's first-order effect on the model's outputs, for every candidate, at once.

Quantizing one layer alone changes its output by δ (its isolated error, computed in the FP pass's hooks);
to first order the model's outputs then change by J δ, J the rest of the network's Jacobian. The predicted
output error is ‖J δ‖², each selected output normalised by its own ‖y‖² (relative output MSE). With random
sign probes r on the outputs, E_r[(rᵀ J δ)²] = ‖J δ‖², and one backward pass of rᵀ y gives g = Jᵀ r at
every layer at once: a candidate then costs one dot product g · δ, never a forward pass (ModelOpt's
auto_quantize scores layers by gradient x error the same way).

Samples are independent in per-sample models (J is block-diagonal over dim 0), so each sample's dot
squares on its own: N samples give N independent estimates from one backward pass. Where a tensor's dim 0
is not the batch, the whole tensor is one group. `probes` backward passes per batch average more.

`g` is taken at the layer's output (for whole-layer candidates a policy can deploy: naive, SmoothQuant per
channel) and at its op's input (candidates that only change the activation quantizer, e.g. another
calibrator's amax: g_x · (Q_c(x) - Q(x)) replaces a layer call; in the scan those products are taken inside
the backward, `InputDots`, and no input gradient is kept). Layers of families without a backward here
(spconv on CPU outside the scan's `cpu_backward` context) get their inputs detached, so no gradient reaches
them or what feeds only them: those are measured exactly (`out_err_source`), as are layers whose gradient is
missing or zero (a `.detach()`, `argmax`, `no_grad` in the model's forward). Where the model writes into a
layer's output or op input after the call (ReLU(inplace=True), `out += identity`: the dataflow says which, and
a forward finds any other), that tensor is copied on the way through, so the write changes neither what the
gradient refers to nor what the hooks compare; every other one is tapped without a copy.
"""

from __future__ import annotations

import logging
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from sensitivity.capture.input_dots import InputDots, VariantDots
from sensitivity.capture.outputs import OutputEnergy, OutputSelector, as_tensor
from sensitivity.capture.probe_signs import ProbeSigns, probe_loss
from sensitivity.capture.recorded import RecordedCall, RecordedForward, detached, versions
from sensitivity.io.batches import Batch, batch_len, batch_map, run_checked
from sensitivity.methods.ranges import InputVariants
from sensitivity.quant.modules import is_wrapped_kind
from sensitivity.quant.registry import has_backward_rule, lacks_backward
from sensitivity.quant.wrapped import OpIntercept, during_forward, op_name

__all__ = ["OnForward", "ProbeGrads", "probe_gradients"]

log = logging.getLogger(__name__)


@dataclass
class ProbeGrads:
    """One batch's probe gradients: per target layer and call, at the output and at the op's input
    (one [K, *shape] tensor each, probe k at index k; None where no gradient reached)."""

    probes: int
    samples: int | None
    out: dict[str, deque[Tensor | None]] = field(default_factory=lambda: defaultdict(deque))
    inp: dict[str, deque[Tensor | None]] = field(default_factory=lambda: defaultdict(deque))
    #: with input variants (`probe_gradients(variants=...)`): their products per call instead of `inp`
    inp_dots: dict[str, deque[VariantDots | None]] = field(default_factory=lambda: defaultdict(deque))
    #: why no gradient was computed for the whole batch (backward failed), or ""
    failed: str = ""
    #: the forward the gradients came from, call by call (`probe_gradients(record=True)`), else None
    forward: RecordedForward | None = None

    def take(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """The next call's (output gradients, input gradients) of `name`, in call order, in float32 again."""
        out, inp = self.out.get(name), self.inp.get(name)
        return _expanded(out.popleft() if out else None), _expanded(inp.popleft() if inp else None)

    def take_dots(self, name: str) -> VariantDots | None:
        """The next call's input-variant products of `name` ([K, samples] each; see `InputDots`)."""
        dots = self.inp_dots.get(name)
        return dots.popleft() if dots else None


class _Slot:
    """One tap's gradients, probe after probe, in one [K, *shape] buffer. float32 gradients are kept in
    bfloat16 until their layer's hook dots them: the K probes' gradients at every layer's output are
    among the scan's largest tensors (about K activation copies of a piece), and their rounding (2^-9
    relative per value, random) moves a dot product by far less than the probes' own sampling error (tens
    of percent per probe). Other dtypes are kept as they are. One buffer, not K tensors: the hook then
    widens it in one op and dots all K probes with one matrix-vector product per sample."""

    __slots__ = ("buf", "count", "probes")

    def __init__(self, probes: int) -> None:
        self.probes, self.count = probes, 0
        self.buf: Tensor | None = None

    def add(self, g: Tensor) -> None:
        if self.buf is None:
            dtype = torch.bfloat16 if g.dtype == torch.float32 else g.dtype
            self.buf = torch.empty((self.probes, *g.shape), dtype=dtype, device=g.device)
        if self.count < self.probes and self.buf.shape[1:] == g.shape:
            self.buf[self.count].copy_(g)
            self.count += 1

    def kept(self) -> Tensor | None:
        """All K gradients, or None where some probe's did not reach the tap."""
        return self.buf if self.count == self.probes else None


class _Discard:
    """A tap's slot that keeps nothing: the tap only links its tensor to the anchor."""

    @staticmethod
    def add(g: Tensor) -> None:
        return None


_DISCARD = _Discard()


def _expanded(grads: Tensor | None) -> Tensor | None:
    if grads is None:
        return None
    return grads.float() if grads.dtype == torch.bfloat16 else grads


class _Tap(torch.autograd.Function):
    """Identity with a side effect: each backward pass through it appends the gradient to `slot`, kept
    compact (`_Slot`) at once. The backward only asks for the gradient of `anchor` (a scalar every tap
    depends on), so autograd holds no full-precision gradient of any layer beyond the moment it passes."""

    @staticmethod
    def forward(
        ctx: Any, t: Tensor, anchor: Tensor, slot: _Slot | InputDots | _Discard, share: bool
    ) -> Tensor:  # type: ignore[override]
        ctx.slot = slot
        # a clone: the rest of the model gets its own tensor (and may modify it in place); a view where
        # nothing writes into `t` afterwards (a layer's op input): no copy, the same gradient
        return t.view_as(t) if share else t.clone()

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        ctx.slot.add(g)
        return g, None, None, None


class _Recorder:
    """Hooks that tap each layer's output (and op input) for the probes' gradients, and keep the calls."""

    def __init__(
        self, probes: int, record: bool = False, written: set[str] | None = None,
        out_written: set[str] | None = None, variants: Mapping[str, InputVariants] | None = None,
        samples: int | None = None, recompute: frozenset[str] = frozenset(),
    ) -> None:  # fmt: skip
        self.anchor = torch.zeros((), requires_grad=True)
        self.probes = probes
        #: (layer, its tap's gradients) per call, in call order: at the output and at the op's input
        self.outs: list[tuple[str, _Slot]] = []
        self.ins: list[tuple[str, _Slot | InputDots]] = []
        #: None: every op input tapped and its gradients kept; else only these layers' inputs, dotted with
        #: their variants inside the backward (`InputDots`; the samples group the products)
        self.variants, self.samples = variants, samples
        self.record = record
        self.recompute = recompute  # layers whose recorded call keeps no output (`RecordedCall.output`)
        self.calls: list[RecordedCall] = []
        self.op_input: dict[str, Tensor] = {}  # wrapped kinds: what the op received in the latest call
        #: layers whose op input the model writes into after the call: their input tap copies it
        self.written = written if written is not None else set()
        #: (layer, op input, its write count) of the input taps that share their tensor, to check after
        self.shared: list[tuple[str, Tensor, int]] = []
        #: layers whose output the model writes into after the call: their output tap hands the model a copy
        #: (None: every output tap does); the others' gradient is taken by a hook on the output itself
        self.out_written = out_written
        #: (layer, output, its write count) of the outputs tapped by a hook, to check after the forward; held
        #: weakly where the recorded call keeps no output (once the model lets it go, nothing writes into it)
        self.hooked: list[tuple[str, Callable[[], Tensor | None], int]] = []

    def _slot(self, where: list[tuple[str, Any]], name: str) -> _Slot:
        slot = _Slot(self.probes)
        where.append((name, slot))
        return slot

    def _tap(self, t: Tensor, where: list[tuple[str, Any]], name: str, share: bool = False) -> Tensor:
        return _Tap.apply(t, self.anchor, self._slot(where, name), share)

    def input_clone(self, name: str, x: Tensor) -> Tensor:
        """The op's input, tapped where its gradient is wanted: a view of `x` (no copy), or a copy for a
        layer whose input the model was seen writing into after the call (the op saved it for the
        backward, and the recorded call must keep what the op received)."""
        if not x.is_floating_point():
            self.op_input[name] = x
            return x
        share = name not in self.written
        if self.variants is None:
            xc = self._tap(x, self.ins, name, share)
        elif name in self.variants:
            dots = InputDots(self.probes, self.variants[name], self.samples)
            self.ins.append((name, dots))
            xc = _Tap.apply(x, self.anchor, dots, share)
            dots.x = xc.detach()
        else:  # no gradient wanted here, but the path to the anchor: the layer's output gradient needs it
            xc = _Tap.apply(x, self.anchor, _DISCARD, share)
        if share:
            self.shared.append((name, x, x._version))
        self.op_input[name] = xc
        return xc

    def written_inputs(self) -> set[str]:
        """After the forward: the layers whose shared op input the model wrote into after the call."""
        return {name for name, x, version in self.shared if x._version != version}

    def written_outputs(self) -> set[str]:
        """After the forward: the layers whose output, tapped by a hook, the model wrote into after the call
        (the recorded output changed with it: that forward must run again with the output copied)."""
        return {
            name for name, ref, version in self.hooked if (y := ref()) is not None and y._version != version
        }

    def _hook_output(self, name: str, y: Tensor) -> bool:
        """Tap `y`'s gradient with a tensor hook, no copy, where the model is not known to write into it
        (and `y` is part of the graph); False where the output tap must copy."""
        if self.out_written is None or name in self.out_written or not y.requires_grad:
            return False
        y.register_hook(self._slot(self.outs, name).add)  # returns None: the gradient passes on unchanged
        self.hooked.append((name, weakref.ref(y) if name in self.recompute else lambda: y, y._version))
        return True

    def _keep(self, name: str, module: nn.Module, args: tuple, out: Any, y: Tensor) -> None:
        """The call, for the FP pass to replay: tensors detached (no graph kept alive through them)."""
        if not self.record:
            return
        x = self.op_input.pop(name, None) if is_wrapped_kind(module) else as_tensor(args[0]) if args else None
        args = tuple(detached(a) for a in args)
        x = x.detach() if x is not None else None
        # none for a layer in `recompute`: the replay computes its output again
        dropped = isinstance(out, Tensor) and name in self.recompute
        kept = None if dropped else detached(out) if not isinstance(out, Tensor) else y.detach()
        self.calls.append(RecordedCall(name, module, args, kept, x, versions(*args, x, kept)))

    def pre_hook(self, name: str) -> Callable[[nn.Module, tuple], Any]:
        def hook(module: nn.Module, args: tuple) -> Any:
            if args and isinstance(args[0], Tensor):
                return (self.input_clone(name, args[0]), *args[1:])
            return None

        return hook

    def out_hook(self, name: str) -> Callable[[nn.Module, tuple, Any], Any]:
        def hook(module: nn.Module, args: tuple, out: Any) -> Any:
            y = as_tensor(out)
            if y is None:
                return None
            self._keep(name, module, args, out, y)
            if not y.is_floating_point() or self._hook_output(name, y):
                return None
            seen = self._tap(y, self.outs, name)  # what the rest of the model sees: a copy
            if isinstance(out, Tensor):
                return seen
            replace = getattr(out, "replace_feature", None)
            return replace(seen) if callable(replace) else None

        return hook


#: what `probe_gradients` tells its caller once the forward is done (selected outputs, the recorded forward)
OnForward = Callable[[dict[str, Tensor], RecordedForward | None], OutputEnergy | None]


def _cut_without_backward(module: nn.Module, args: tuple) -> tuple | None:
    """Pre-hook: a module with no backward for this input (e.g. spconv on a CPU-only torch outside the scan's
    run context) gets its inputs detached."""
    if args and lacks_backward(module, args[0]):
        return tuple(detached(a) for a in args)
    return None


@contextmanager
def _recording(
    model: nn.Module, names: Sequence[str], probes: int, record: bool = False, written: set[str] | None = None,
    out_written: set[str] | None = None, variants: Mapping[str, InputVariants] | None = None,
    samples: int | None = None, recompute: frozenset[str] = frozenset(),
) -> Iterator[_Recorder]:  # fmt: skip
    rec = _Recorder(probes, record, written, out_written, variants, samples, recompute)
    with ExitStack() as stack:
        for mod in model.modules():
            if has_backward_rule(mod):
                stack.callback(mod.register_forward_pre_hook(_cut_without_backward).remove)
        for name in names:
            mod = model.get_submodule(name)
            if is_wrapped_kind(mod):
                op = op_name(mod)
                assert op is not None
                tap = OpIntercept(op, lambda x, w, _n=name: (rec.input_clone(_n, x), w))
                stack.enter_context(during_forward(mod, tap))
            else:
                stack.callback(mod.register_forward_pre_hook(rec.pre_hook(name)).remove)
            stack.callback(mod.register_forward_hook(rec.out_hook(name)).remove)
        yield rec


def probe_gradients(
    model: nn.Module,
    batch: Batch,
    names: Sequence[str],
    select: OutputSelector,
    probes: int,
    signs: ProbeSigns,
    index: int = 0,
    energy: OutputEnergy | None = None,
    record: bool = False,
    written: set[str] | None = None,
    on_forward: OnForward | None = None,
    out_written: set[str] | None = None,
    variants: Mapping[str, InputVariants] | None = None,
    recompute: frozenset[str] = frozenset(),
) -> ProbeGrads:
    """One FP forward with autograd and `probes` backward passes of random output probes: the gradient of
    each probe at every target layer's output and op input. Modules without a backward here (spconv on
    CPU) get their inputs detached; parameters keep requires_grad=False (only activation gradients).
    `record`: keep the forward call by call (`ProbeGrads.forward`), so the FP pass need not run again.
    `written`: the layers whose op input the model writes into after the call, learned here (a forward
    that finds a new one runs again, with those inputs copied) and kept by the caller for later pieces.
    `out_written`: the same for layer outputs (None: every output is copied for the model; otherwise the
    outputs of the other layers are tapped by a hook on the output itself, without a copy).
    `on_forward`: called once the forward is done, before any backward, with the selected outputs
    (detached) and the recorded forward; the energies it returns normalise the probes instead of `energy`.
    `variants`: the layers whose input gradients are wanted only dotted with their input variants: those
    are dotted inside the backward (`ProbeGrads.take_dots`) and no other op input is tapped (None: every
    op input's gradients are kept, `ProbeGrads.take`). `recompute`: layers whose recorded call keeps no
    output (the replay computes it again: `RecordedCall.output`)."""
    written = written if written is not None else set()
    result = ProbeGrads(probes, batch_len(batch))
    with (
        torch.enable_grad(),
        _recording(
            model, names, probes, record, written, out_written, variants, result.samples, recompute
        ) as rec,
    ):
        out = run_checked(model, batch, index)
        flat = select(out)
    new_writes, new_out_writes = rec.written_inputs(), rec.written_outputs()
    # the op saved a tensor the model then changed (that backward would fail), or the recorded output changed
    if new_writes or new_out_writes:
        written.update(new_writes)
        if out_written is not None:
            out_written.update(new_out_writes)
        del out, flat, rec
        return probe_gradients(
            model, batch, names, select, probes, signs, index, energy, record, written, on_forward, out_written,
            variants, recompute,
        )  # fmt: skip
    if record:
        result.forward = RecordedForward(rec.calls, batch_map(out, Tensor.detach))
    if on_forward is not None:
        energy = on_forward({k: v.detach() for k, v in flat.items()}, result.forward)
    taps = rec.outs + rec.ins
    try:
        for k in range(probes):
            with torch.enable_grad():
                loss = probe_loss(flat, signs, energy)
            if loss is None or not taps or not loss.requires_grad:
                break
            torch.autograd.grad(loss, [rec.anchor], retain_graph=k < probes - 1, allow_unused=True)
    except Exception as exc:  # a custom op without a working backward: every layer is measured exactly
        result.failed = (
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
        )
        log.info("output probes failed (%s); layers are measured exactly", result.failed)
    for name, slot in rec.outs:
        result.out[name].append(None if result.failed else slot.kept())
    for name, tap in rec.ins:
        if isinstance(tap, InputDots):
            result.inp_dots[name].append(None if result.failed else tap.kept())
        else:
            result.inp[name].append(None if result.failed else tap.kept())
    return result
