"""The FP pass replayed from the probes' recorded forward against a second FP forward (what the scan did
before): the same isolated, cumulative and predicted errors, observers and histograms; and a model that
writes into a layer's input after the call falls back to the second forward."""

from __future__ import annotations

import collections
import math
from typing import Any

import pytest
import torch
from torch import nn

from sensitivity.capture import passes
from sensitivity.capture.calibrate import calibrate
from sensitivity.capture.observe import RangeHistogram
from sensitivity.capture.passes import PassResult, compare_pass
from sensitivity.capture.recorded import RecordedForward
from sensitivity.graph import record_dataflow
from sensitivity.methods.candidates import build_candidates
from sensitivity.methods.ranges import InputVariants
from sensitivity.prepare import prepare
from sensitivity.quant.build import ActQuant, build_quant_model, quant_layers
from sensitivity.spec import QuantSpec
from tests.subclass_models import Conv2dSame, build_subclass_net


class Residual(nn.Module):
    """Conv, in-place ReLU, a depthwise conv and a residual add: the layer outputs are modified in place
    by the model after the call (what the recorded outputs must not see)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.a(x))
        h = h + self.act(self.dw(h))
        return self.b(h)


class WritesIntoInput(nn.Module):
    """A padded conv subclass (its op input is intercepted, its module argument is the model's own tensor)
    whose argument the model then changes in place: a replayed candidate would see other values."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, 4, 1)
        self.same = Conv2dSame(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        y = self.same(h)
        h.mul_(3.0)
        return y + h


def scan_setup(
    model: nn.Module, batches: list[torch.Tensor]
) -> tuple[Any, dict, nn.Module, dict, dict, dict]:
    """What a comparison pass gets in a scan, built by hand: the prepared model, observers calibrated on the
    first two batches, the quantized model, candidates (naive, other sign, SmoothQuant 0.5), one input range
    variant per layer (half the amax) and the report's range histograms."""
    prep = prepare(model, batches[0])
    spec = QuantSpec()
    obs = calibrate(prep.model, prep.layers, batches[:2], spec)
    qmodel = build_quant_model(prep.model, {n: ActQuant(o.amax(), False) for n, o in obs.items()}, spec)
    qlayers = quant_layers(qmodel)
    fixed = {layer.name for layer in prep.layers if layer.weight_transformed}
    cands, _ = build_candidates(qlayers, obs, spec, (0.5,), ("channel",), "static", no_smoothing=fixed)
    variants = {
        n: InputVariants(q.input_quantizer, {"half": obs[n].amax() * 0.5}) for n, q in qlayers.items()
    }
    hists = {n: RangeHistogram(min(o.min_value, 0.0), o.max_abs) for n, o in obs.items()}
    return prep, obs, qmodel, cands, variants, hists


def _run(model: nn.Module, replay: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[PassResult, dict, Any]:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(3, 3, 8, 8, generator=g) for _ in range(3)]
    prep, obs, qmodel, cands, variants, hists = scan_setup(model, batches)
    if not replay:
        monkeypatch.setattr(RecordedForward, "intact", lambda self: False)
    res = compare_pass(
        prep.model, qmodel, prep.layers, batches[2:], candidates=cands, variants=variants, observers=obs,
        histograms=hists, probes=2, stored_budget_mb=0.0,
    )  # fmt: skip
    monkeypatch.undo()
    return res, {n: o.amax() for n, o in obs.items()}, {n: h.counts for n, h in hists.items()}


def _count_replays(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per piece whose FP pass replayed the probes' forward (instead of a second forward)."""
    calls: list[int] = []
    real = passes._Compare.replay
    monkeypatch.setattr(passes._Compare, "replay", lambda self, f: calls.append(1) or real(self, f))
    return calls


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize(
    "make",
    [Residual, build_subclass_net, lambda: KeepsOutputs("forward_ret_dict")],
    ids=["residual-inplace", "conv-subclasses", "keeps-autograd-outputs"],
)
def test_replayed_fp_pass_equals_a_second_forward(make: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = make().eval()
    calls = _count_replays(monkeypatch)
    fast, amax_fast, hist_fast = _run(model, True, monkeypatch)
    assert calls, "the recorded forward was not replayed"
    slow, amax_slow, hist_slow = _run(model, False, monkeypatch)
    assert fast.iso.keys() == slow.iso.keys() and len(fast.iso) > 0
    for key in slow.iso:
        for m, v in slow.iso[key].metrics().items():
            assert _same(fast.iso[key].metrics()[m], v), (key, m)
    for name in slow.cum:
        for m, v in slow.cum[name].metrics().items():
            assert _same(fast.cum[name].metrics()[m], v), (name, m)
    assert fast.pred.keys() == slow.pred.keys() and any(k[1] == "naive_half" for k in fast.pred)
    for key in slow.pred:
        assert fast.predicted(*key) == pytest.approx(slow.predicted(*key), rel=1e-6)
    for name in amax_slow:
        assert float(amax_fast[name]) == float(amax_slow[name])
        assert torch.equal(hist_fast[name], hist_slow[name])


def test_a_layer_input_written_after_the_call_falls_back_to_a_second_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = WritesIntoInput().eval()
    calls = _count_replays(monkeypatch)
    fast, _, _ = _run(model, True, monkeypatch)
    assert not calls, "replayed although the model wrote into a layer's argument"
    slow, _, _ = _run(model, False, monkeypatch)
    for key in slow.iso:
        assert fast.iso[key].metrics() == pytest.approx(slow.iso[key].metrics(), rel=1e-6, nan_ok=True)
    # the second forward's candidates saw the argument as the layer did: the naive error is small
    assert slow.iso[("same", "naive")].metrics()["rel_l1"] < 0.05


class KeepsOutputs(nn.Module):
    """Stores what its forward computed on itself, as OpenPCDet's heads do (`forward_ret_dict`), under the
    attribute `attr` (a public name, a private one, or kept inside a list)."""

    def __init__(self, attr: str = "forward_ret_dict") -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 1)
        self.attr = attr
        setattr(self, attr, {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        setattr(self, self.attr, {"pred": [y]} if self.attr != "_history" else [[y]])
        return y

    def kept(self) -> torch.Tensor:
        value = getattr(self, self.attr)
        return value["pred"][0] if isinstance(value, dict) else value[0][0]


_Kept = collections.namedtuple("_Kept", "pred")


class KeepsFrozen(KeepsOutputs):
    """Keeps its output in a named tuple: a container `release_graph_` does not rebuild."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x)))
        self.forward_ret_dict = _Kept([y])
        return y

    def kept(self) -> torch.Tensor:
        return self.forward_ret_dict.pred[0]


@pytest.mark.parametrize(
    ("make", "replayed"),
    [
        (lambda: KeepsOutputs("forward_ret_dict"), True),
        (lambda: KeepsOutputs("_last"), True),
        (lambda: KeepsOutputs("_history"), True),
        (KeepsFrozen, False),
    ],
    ids=["public", "private", "nested-list", "unchangeable-container"],
)
def test_a_model_that_keeps_autograd_tensors_is_released_and_stays_copyable(
    make: Any, replayed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tensors a model kept from the probes' forward are detached in place and the forward replayed;
    where a container refuses the change, a no-grad forward overwrites it instead. Either way the model
    then holds what a plain forward leaves (no graph): it deep-copies, as `ScanResult.quantized_model`
    does."""
    import copy

    from sensitivity import ScanOptions, scan

    torch.manual_seed(0)
    model = make().eval()
    calls = _count_replays(monkeypatch)
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    result = scan(model, batches, ScanOptions(probes=2))
    assert bool(calls) == replayed
    assert result.fp_model is not None
    kept = [m.kept() for m in result.fp_model.modules() if isinstance(m, KeepsOutputs)]
    assert kept and all(t.grad_fn is None for t in kept)
    copy.deepcopy(result.fp_model)
    result.quantized_model("policy")(batches[0])


class WritesPlainInput(nn.Module):
    """A plain conv whose input the model scales in place after the call (the op saved that tensor for
    its backward: tapped without a copy, the backward would fail)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        y = self.conv(h)
        h.mul_(3.0)
        return y + h


def _grads(model: nn.Module, written: set[str], out_written: set[str] | None = None) -> tuple[Any, list[int]]:
    from sensitivity.capture.outputs import OutputSelector
    from sensitivity.capture.probe_signs import ProbeSigns
    from sensitivity.capture.probes import probe_gradients

    runs: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, a: runs.append(1))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    grads = probe_gradients(
        model, x, names, OutputSelector(), 2, ProbeSigns(5, x), written=written,
        out_written=out_written,
    )  # fmt: skip
    handle.remove()
    return grads, runs


def _same_grads(a: Any, b: Any, names: set[str]) -> None:
    for name in names:
        for kind in ("out", "inp"):
            ga, gb = getattr(a, kind)[name], getattr(b, kind)[name]
            assert len(ga) == len(gb)
            for x, y in zip(ga, gb, strict=True):
                assert (x is None) == (y is None)
                assert x is None or torch.equal(x, y), (name, kind)


@pytest.mark.parametrize("make", [Residual, build_subclass_net, WritesPlainInput])
def test_input_taps_without_a_copy_give_the_same_gradients(make: Any) -> None:
    """Op inputs are tapped as views (no copy) unless the model writes into them after the call, which the
    first forward finds (then it runs again with those inputs copied): the same gradients as copying all."""
    torch.manual_seed(0)
    model = make().eval()
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    learned: set[str] = set()
    shared, runs = _grads(model, learned)
    copied, _ = _grads(model, set(names))
    assert not shared.failed and not copied.failed
    assert learned == ({"conv"} if make is WritesPlainInput else set())
    assert len(runs) == (2 if make is WritesPlainInput else 1)
    _same_grads(shared, copied, names)
    _, again = _grads(model, learned)  # what was learned holds for the next piece: one forward
    assert len(again) == 1


@pytest.mark.parametrize("make", [Residual, build_subclass_net, WritesPlainInput])
def test_outputs_tapped_by_a_hook_give_the_same_gradients(make: Any) -> None:
    """Outputs the model does not write into are tapped by a hook on the output itself (no copy); the
    dataflow names the others, and a write it did not foresee is found after the forward, which then runs
    again with that output copied: the same gradients as copying every output."""
    torch.manual_seed(0)
    model = make().eval()
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    foreseen = record_dataflow(model, x).written_outputs(names)
    assert foreseen == {"Residual": {"a", "dw"}, "WritesPlainInput": {"pre"}}.get(
        type(model).__name__, foreseen
    )
    copied, runs_copied = _grads(model, set(), None)
    hooked, runs_hooked = _grads(model, set(), set(foreseen))
    learned: set[str] = set()
    found, _ = _grads(model, set(), learned)
    assert learned == foreseen and len(runs_hooked) == len(runs_copied)
    assert not copied.failed and not hooked.failed and not found.failed
    _same_grads(copied, hooked, names)
    _same_grads(copied, found, names)
