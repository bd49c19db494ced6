"""Kept FP layer outputs: an exact check that reuses them gives the same value to the last bit as one that
recomputes every layer, skips the layers its quantized layer does not reach, and recomputes any layer whose
input differs even in one bit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sensitivity.capture.kept import MIN_MACS_PER_VALUE, KeptOutputs
from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.passes import compare_pass
from sensitivity.pipeline.exact import OutputReference
from sensitivity.quant.build import LayerQuant, configure_layers
from tests.capture.test_quantized_pass import naive_setup

C = 16  # a 3x3 conv over 16 channels does 144 multiply-adds per output value: worth keeping
assert 9 * C >= MIN_MACS_PER_VALUE


class TwoHeads(nn.Module):
    """A trunk (one conv called twice: a shared module), then two heads the other's layers never reach;
    every activation is in place, so a kept output handed out without a copy would be overwritten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.shared = nn.Conv2d(C, C, 3, padding=1)
        self.a1, self.a2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, 4, 3, padding=1)
        self.b1, self.b2 = nn.Conv2d(C, C, 3, padding=1), nn.Conv2d(C, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.stem(x).relu_()
        t = self.shared(t).relu_()
        t = self.shared(t).relu_()
        return {"a": self.a2(self.a1(t).relu_()), "b": self.b2(self.b1(t).relu_())}


def kept_setup(make: Any, batches: list[Any], held: int):  # type: ignore[no-untyped-def]
    """`make()` prepared and calibrated on `batches`, its quantized copy, the layer names, each one's naive
    setting, and the FP reference of the batches from `held` on (one piece each: nothing kept yet)."""
    torch.manual_seed(0)
    prep, qmodel, naive = naive_setup(make().eval(), batches)
    ref = OutputReference.run(prep.model, prep.layers, batches[held:], OutputSelector(), budget_mb=0.0)
    return prep, qmodel, list(naive), naive, ref


def _setup():  # type: ignore[no-untyped-def]
    batches = [torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return kept_setup(TwoHeads, batches, 1)


def test_exact_checks_are_bit_identical_and_skip_what_the_layer_does_not_reach() -> None:
    prep, qmodel, names, naive, ref = _setup()
    plain = {n: ref.alone(qmodel, names, n, naive[n]) for n in names}
    ref.keep_layer_outputs(prep.model, 64.0)
    # the stem does 27 multiply-adds per output value (3 input channels): not worth keeping
    assert ref.kept is not None and set(ref.kept.names) == set(names) - {"stem"}
    for n in names:
        ref.kept.hits = ref.kept.misses = 0
        assert ref.alone(qmodel, names, n, naive[n]) == plain[n] > 0.0
        if n == "a1":  # the trunk (both calls of `shared`) and the other head come from the kept outputs
            assert ref.kept.hits == 4 * 2 and ref.kept.misses == 1 * 2  # per call, on each of the 2 pieces
        if n == "stem":  # everything after the stem sees another input: nothing is skipped
            assert ref.kept.hits == 0 and ref.kept.misses == 6 * 2
    # a second round gives the same values: no kept output was overwritten by the in-place activations
    assert {n: ref.alone(qmodel, names, n, naive[n]) for n in names} == plain
    ref.drop_layer_outputs()
    assert ref.kept is None


def test_a_layer_whose_input_differs_in_one_bit_runs() -> None:
    prep, qmodel, names, _, ref = _setup()
    kept = KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 64.0)
    layer = qmodel.get_submodule("b1")
    x = kept.pieces[0]["b1"][0].x.clone()
    with kept.serving(qmodel, set(names)) as serving:
        serving.piece(0)
        assert torch.equal(layer(x.clone()), kept.pieces[0]["b1"][0].out)
        flat = x.view(-1)
        flat[7] = torch.nextafter(flat[7], torch.tensor(float("inf")))  # one ulp: sums may not see it
        serving.piece(0)
        y = layer(x)
        assert kept.misses == 1 and not torch.equal(y, kept.pieces[0]["b1"][0].out)
    assert "forward" not in vars(layer)  # the layer is itself again after the block


def test_untimed_the_budget_keeps_the_most_multiply_adds_per_byte() -> None:
    prep, _, _, _, ref = _setup()
    assert all(li.seconds > 0 for li in prep.layers)  # the calibration pass timed every layer
    for li in prep.layers:
        li.seconds = 0.0  # as after a resumed calibration: multiply-adds stand for the time
    sizes = {li.name: li for li in prep.layers}
    one = 4.0 * 2 * (C * 12 * 12) * 2 / 2**20  # input + output of one 16-channel call, 2 samples
    assert sizes["shared"].calls == 2 and sizes["a1"].calls == 1  # the calibration pass counted the calls
    # multiply-adds per value kept (input and output): shared, a1, b1 72 (in execution order); a2 28.8
    # (0.625 units of `one`), b2 16 (0.5625 units); shared holds 2 units (2 calls)
    assert KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 3.2 * one).names == ["shared", "a1"]
    assert KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 1.1 * one).names == ["a1"]
    assert KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 4.7 * one).names == [
        "shared",
        "a1",
        "b1",
        "a2",
    ]
    assert KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 0.0).names == []


def test_timed_the_budget_keeps_the_most_time_per_byte() -> None:
    """A layer slow for its multiply-adds (spconv's CPU kernels are) is kept before faster ones."""
    prep, _, _, _, ref = _setup()
    one = 4.0 * 2 * (C * 12 * 12) * 2 / 2**20
    for li in prep.layers:
        li.seconds = 1e-4 * li.macs / 144  # as fast per multiply-add as each other: the same order as MACs
    assert KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 1.1 * one).names == ["a1"]
    slow = next(li for li in prep.layers if li.name == "b2")
    slow.seconds *= 100.0
    assert KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 1.1 * one).names == ["b2"]
    assert KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 1.7 * one).names == ["b2", "a1"]


def test_verification_passes_give_the_same_results_with_kept_outputs() -> None:
    """The full pass (its FP forward served from the kept outputs) and the outputs-only check (its FP layers
    served where their input is the FP one): every error equal to the last bit."""
    prep, qmodel, _, naive, ref = _setup()
    held = [piece for _, piece in ref.pieces]
    configs = {**naive, "a2": LayerQuant("fp"), "b1": LayerQuant("fp")}

    def full() -> tuple[dict, dict, float]:
        configure_layers(qmodel, configs)
        res = compare_pass(prep.model, qmodel, prep.layers, held, energy=ref.energy, kept=ref.kept)
        cum = {n: s.metrics() for n, s in res.cum.items()}
        return cum, {k: s.metrics() for k, s in res.out.items()}, res.out_rel_mse()

    before, checked = full(), ref.check(qmodel, prep.layers, configs).out_rel_mse()
    ref.keep_layer_outputs(prep.model, 64.0)
    assert ref.kept is not None
    assert full() == before and ref.kept.hits == 6 * 2  # the FP forward: all 6 kept calls, both pieces
    assert full() == before  # the pass compared against the kept outputs themselves: still intact
    ref.kept.hits = 0
    assert ref.check(qmodel, prep.layers, configs).out_rel_mse() == checked > 0.0
    assert ref.kept.hits == 0  # a2 and b1 are in FP, but their inputs come from quantized layers


def _made_by(monkeypatch, maker: str) -> list[KeptOutputs]:  # type: ignore[no-untyped-def]
    """Every KeptOutputs the classmethod `maker` makes from now on, in order."""
    made: list[KeptOutputs] = []
    make = getattr(KeptOutputs, maker).__func__

    def spy(cls, *args, **kwargs):  # type: ignore[no-untyped-def]
        made.append(make(cls, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(KeptOutputs, maker, classmethod(spy))
    return made


def test_a_scan_whose_samples_exceed_the_budget_keeps_outputs_and_decides_the_same(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """End to end: where one sample's probe copies exceed the stored-activation budget (a LiDAR frame), the
    exact checks and verification keep FP outputs; every decision and number is that of the scan without."""
    from sensitivity import ScanOptions, scan
    from tests.test_output_policy import LoudBranch, _batches

    batches = _batches(4, (2, 3, 16, 16))
    opts = ScanOptions(stored_activation_mb=0.01, max_fp_layers=2)  # 0.01 MiB: under one sample's outputs
    made = _made_by(monkeypatch, "record")
    with_kept = scan(LoudBranch(), batches, opts)
    # the budget holds what the probes' pieces held beyond a verification pass: one of the two layers here
    assert len(made) == 1 and made[0].names and set(made[0].names) <= {"loud", "mild"} and made[0].hits > 0
    monkeypatch.setattr(OutputReference, "keep_layer_outputs", lambda self, fp, budget_mb: None)
    without = scan(LoudBranch(), batches, opts)
    assert len(made) == 1
    assert with_kept.policy == without.policy and with_kept.excluded == without.excluded
    assert with_kept.table.equals(without.table)


def test_one_held_out_piece_takes_its_reference_and_kept_outputs_from_the_probes_forward(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A held-out set that is one piece (one LiDAR frame): the probes' forward of it gives the FP outputs
    and the kept layer outputs, so two FP forwards fewer run (the reference's and the kept outputs'), and
    every decision and number is that of the scan that runs them."""
    from sensitivity import ScanOptions, scan
    from sensitivity.pipeline import measure
    from tests.test_output_policy import LoudBranch, _batches

    batches = _batches(4, (1, 3, 16, 16))  # one sample held out
    opts = ScanOptions(stored_activation_mb=0.01, max_fp_layers=2)  # one sample's outputs exceed it
    fp_forwards: list[int] = []
    forward = LoudBranch.forward

    def counted(self, x):  # type: ignore[no-untyped-def]
        if type(self.mild) is nn.Conv2d:  # the FP model (the quantized copy has quantized layers)
            fp_forwards.append(1)
        return forward(self, x)

    monkeypatch.setattr(LoudBranch, "forward", counted)
    made = _made_by(monkeypatch, "of_calls")
    fast = scan(LoudBranch(), batches, opts)
    fast_forwards = len(fp_forwards)
    assert len(made) == 1 and set(made[0].names) == {"loud", "mild"} and made[0].hits > 0
    monkeypatch.setattr(measure, "_reference_from_probes", lambda *args: None)
    fp_forwards.clear()
    slow = scan(LoudBranch(), batches, opts)
    assert len(made) == 1
    assert len(fp_forwards) == fast_forwards + 2
    assert fast.policy == slow.policy and fast.excluded == slow.excluded
    assert fast.table.equals(slow.table)


def test_a_forward_the_module_holds_itself_is_served_around_and_put_back() -> None:
    prep, qmodel, names, _, ref = _setup()
    layer = qmodel.get_submodule("b1")
    calls: list[int] = []
    own = layer.forward

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return own(x)

    layer.forward = counted  # type: ignore[method-assign]
    kept = KeptOutputs.record(prep.model, prep.layers, ref.pieces, 2, 64.0)
    x = kept.pieces[0]["b1"][0].x
    with kept.serving(qmodel, set(names)) as serving:
        serving.piece(0)
        layer(x.clone())  # served: the module's own forward does not run
        layer(x + 1.0)  # the second call (none was kept) runs the module's own forward
    assert calls == [1] and vars(layer)["forward"] is counted
