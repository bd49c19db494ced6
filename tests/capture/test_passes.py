"""`compare_pass` on its own: isolated candidates, cumulative errors and the first non-finite layer, each
against errors computed here directly (exact sums: the same tensors go in)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sensitivity.capture.calibrate import calibrate
from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.passes import compare_pass
from sensitivity.capture.pieces import sample_mb, verify_copies
from sensitivity.metrics import ErrorStats
from sensitivity.pipeline.exact import OutputReference
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.pipeline.verify import Verifier
from sensitivity.prepare import prepare
from sensitivity.quant.build import ActQuant, LayerQuant, build_quant_model
from sensitivity.spec import QuantSpec


class Two(nn.Module):
    def __init__(self, poison: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 2, 1)
        self.poison = poison

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if self.poison:
            h = h / (h - h)  # 0/0: NaN after `a`
        return self.b(h)


def _setup(poison: bool = False):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = Two(poison=False).eval()
    batches = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    prep = prepare(model, batches[0], fold_bn=False)
    spec = QuantSpec()
    obs = calibrate(prep.model, prep.layers, batches, spec)
    acts = {n: ActQuant(o.amax(), False) for n, o in obs.items()}
    qmodel = build_quant_model(prep.model, acts, spec)
    qmodel.poison = poison
    return prep, qmodel, batches


def test_isolated_candidates_are_measured_against_the_fp_output() -> None:
    prep, qmodel, batches = _setup()
    layer = copy.deepcopy(prep.model.a)  # not the hooked module itself
    cands = {"a": {"same": lambda args: layer(*args), "plus1": lambda args: layer(*args) + 1.0}}
    res = compare_pass(prep.model, qmodel, prep.layers, batches, candidates=cands)
    assert res.iso[("a", "same")].metrics()["max_abs"] == 0.0
    plus = res.iso[("a", "plus1")].metrics()
    # (y + 1) - y is 1 up to one float32 ulp of y
    assert abs(plus["l1"] - 1.0) < 1e-6 and abs(plus["max_abs"] - 1.0) < 1e-6 and plus["nonfinite"] == 0
    assert res.calls == {"a": 3, "b": 3}


def test_cumulative_errors_equal_a_direct_computation() -> None:
    prep, qmodel, batches = _setup()
    expected = {n: ErrorStats() for n in ("a", "b")}
    for x in batches:
        seen: dict[str, dict[str, torch.Tensor]] = {"fp": {}, "q": {}}
        for tag, m in (("fp", prep.model), ("q", qmodel)):
            store = seen[tag]
            hooks = [getattr(m, n).register_forward_hook(lambda _m, _a, o, n=n, s=store: s.__setitem__(n, o))
                     for n in ("a", "b")]  # fmt: skip
            with torch.no_grad():
                m(x.clone())
            for h in hooks:
                h.remove()
        for n in expected:
            expected[n].update(seen["fp"][n], seen["q"][n].clone())
    res = compare_pass(prep.model, qmodel, prep.layers, batches)
    for n, stats in expected.items():
        assert res.cum[n].metrics() == stats.metrics(), n
    assert res.first_nonfinite is None


def test_pieces_of_a_batch_give_the_same_sums() -> None:
    prep, qmodel, batches = _setup()
    whole = compare_pass(prep.model, qmodel, prep.layers, batches, stored_budget_mb=0)
    pieces = compare_pass(
        prep.model, qmodel, prep.layers, batches, stored_budget_mb=1e-4
    )  # one sample a piece
    for n in ("a", "b"):
        w, p = whole.cum[n].metrics(), pieces.cum[n].metrics()
        # the same numbers up to float rounding (convs of other batch sizes sum in another order)
        for key in ("l1", "max_abs", "sqnr_db"):
            assert abs(w[key] - p[key]) <= 1e-4 * abs(w[key]), (n, key)


def test_the_first_non_finite_layer_and_what_ran_before_it_are_named() -> None:
    prep, qmodel, batches = _setup(poison=True)
    res = compare_pass(prep.model, qmodel, prep.layers, batches)
    # NaN appears in a function between the layers: `b` is the first module whose output shows it
    assert res.first_nonfinite == "b" and res.nonfinite_upstream == ["a", "b"]
    assert res.cum["b"].nonfinite > 0 and res.cum["a"].nonfinite == 0


def _batch_sizes(model: nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    return sizes, handle


def test_a_pass_sized_for_more_copies_cuts_smaller_pieces() -> None:
    """`copies`: a verification pass is cut like the measure stage's pass (which held the probes' gradients
    too), so verifying never holds more than that pass did; the sums stay those of whole batches."""
    prep, qmodel, batches = _setup()
    budget = sample_mb(prep.layers) * 4.5  # 4 samples of FP outputs fit; 2 when each is held 2x
    runs = {}
    for copies in (None, 1, 2, 4):
        sizes, handle = _batch_sizes(prep.model)
        res = compare_pass(prep.model, qmodel, prep.layers, batches, stored_budget_mb=budget, copies=copies)
        handle.remove()
        runs[copies] = (sizes, res)
    assert runs[None][0] == runs[1][0] == [4, 4, 4]
    assert runs[2][0] == [2] * 6 and runs[4][0] == [1] * 12
    for copies in (2, 4):
        for n in ("a", "b"):
            w, p = runs[None][1].cum[n].metrics(), runs[copies][1].cum[n].metrics()
            for key in ("l1", "rel_l1", "mse", "max_abs", "sqnr_db"):
                assert abs(w[key] - p[key]) <= 1e-4 * abs(w[key]), (copies, n, key)


def test_the_verifier_cuts_its_passes_like_the_probed_pass() -> None:
    """With K probes per piece the measure stage held 1 + K copies of a piece's outputs (its probe pass
    1 + K + 2): the verifier's passes are cut for 1 + K, as the reference's are; where one sample's probe
    pass alone exceeded the budget, that pass held more than any piece within it, and the verifier keeps
    whole pieces within the budget (as without probes)."""
    prep, qmodel, batches = _setup()
    budget = sample_mb(prep.layers) * 4.5  # one sample's probe pass fits at K = 1 (4 copies), not at K = 3
    opts = ScanOptions(stored_activation_mb=budget)
    configs = {n: LayerQuant("naive", qmodel.get_submodule(n).input_quantizer.amax) for n in ("a", "b")}
    for probes, want in ((0, [4, 4, 4]), (1, [2] * 6), (3, [4, 4, 4])):
        sizes, handle = _batch_sizes(prep.model)
        Verifier(prep.model, qmodel, prep.layers, batches, opts, PhaseProgress(), probes=probes).run(
            configs, "t"
        )
        handle.remove()
        assert sizes == want, probes
        ref = OutputReference.run(
            prep.model, prep.layers, batches, OutputSelector(), budget_mb=budget,
            copies=verify_copies(prep.layers, budget, probes),
        )  # fmt: skip
        assert [int(piece.shape[0]) for _, piece in ref.pieces] == want, probes
