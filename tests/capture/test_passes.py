"""`compare_pass` on its own: isolated candidates, cumulative errors and the first non-finite layer, each
against errors computed here directly (exact sums: the same tensors go in)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sensitivity.capture.calibrate import calibrate
from sensitivity.capture.passes import compare_pass
from sensitivity.metrics import ErrorStats
from sensitivity.prepare import prepare
from sensitivity.quant.build import ActQuant, build_quant_model
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
