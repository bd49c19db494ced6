"""A held-out piece probed in parts (the probes' autograd forward of the whole piece would not fit the
budget), then compared in one FP pass over the whole piece: the same isolated, cumulative and predicted
errors, observers and histograms as its parts scanned as pieces of their own; and parts whose layer
outputs do not carry the samples along dim 0 run as pieces of their own."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sensitivity.capture import passes
from sensitivity.capture.dots import sample_dots
from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.passes import PassResult, compare_pass
from sensitivity.capture.pieces import probe_copies, sample_mb, split_copies
from sensitivity.capture.split_grads import GradParts
from sensitivity.pipeline.exact import OutputReference
from tests.capture.test_replay import Residual, scan_setup
from tests.subclass_models import build_subclass_net

PROBES = 2


class SequenceFirst(nn.Module):
    """A Conv1d, then a Linear on [L, N, C] (sequence first, as RNN-style code keeps it): the Linear's
    output has the sequence, not the samples, along dim 0."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).permute(2, 0, 1)  # [L, N, C]
        return self.fc(h).permute(1, 2, 0)  # back to [N, C, L]


def _scan_pieces(
    model: nn.Module, sample: torch.Tensor, whole: bool, energy: bool = True
) -> tuple[PassResult, dict, dict]:
    """Two held-out samples pairs: as one batch of 4 (a piece that fits the budget with the probes'
    gradients, but whose probes' forward fits only 2 samples: probed in parts), or as two batches of 2."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, *sample.shape, generator=g) for _ in range(3)]
    prep, obs, qmodel, cands, variants, hists = scan_setup(model, batches)
    # 4 samples with the gradients (split_copies) fit, 2 (not 3) with the autograd forward (probe_copies)
    per_sample = sample_mb(prep.layers)
    budget = per_sample * 4.2 * split_copies(PROBES)
    assert int(budget / probe_copies(PROBES) // per_sample) == 2
    held = [batches[2]] if whole else list(batches[2].split(2))
    # the scan's probes are normalised by the held-out outputs' energies; without, by each piece's own
    ref = OutputReference.run(prep.model, prep.layers, held, OutputSelector()) if energy else None
    res = compare_pass(
        prep.model, qmodel, prep.layers, held, candidates=cands, variants=variants, observers=obs,
        histograms=hists, probes=PROBES, stored_budget_mb=budget, energy=ref.energy if ref else None,
    )  # fmt: skip
    return res, {n: float(o.amax()) for n, o in obs.items()}, {n: h.counts for n, h in hists.items()}


def _probed_in_parts(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What each `probe_parts` call returned (True: the piece's FP pass ran whole on the parts' probes)."""
    calls: list[bool] = []
    real = passes._Compare.probe_parts

    def spy(self: Any, *args: Any) -> bool:
        calls.append(real(self, *args))
        return calls[-1]

    monkeypatch.setattr(passes._Compare, "probe_parts", spy)
    return calls


def _assert_same(a: PassResult, b: PassResult, rel: float) -> None:
    """Every error and prediction alike (the model-output error where it adds up over pieces: under one
    `OutputEnergy`; without, it is each piece's own ratio)."""
    assert a.iso.keys() == b.iso.keys() and len(a.iso) > 0
    for key in b.iso:
        for m, v in b.iso[key].metrics().items():
            assert a.iso[key].metrics()[m] == pytest.approx(v, rel=rel, abs=1e-9, nan_ok=True), (key, m)
    for name in b.cum:
        for m, v in b.cum[name].metrics().items():
            assert a.cum[name].metrics()[m] == pytest.approx(v, rel=rel, abs=1e-9, nan_ok=True), (name, m)
    assert a.pred.keys() == b.pred.keys() and any(k[1] == "naive_half" for k in a.pred)
    for key in b.pred:
        assert a.predicted(*key) == pytest.approx(b.predicted(*key), rel=rel), key
    if a.energy_normalised:
        assert a.out_rel_mse() == pytest.approx(b.out_rel_mse(), rel=rel)


# conv outputs of a batch of 4 and of 2 may differ in the last bits (the kernels block batches differently):
# 1e-5 relative is far above that and far below any difference of method (other probes change the
# predictions by tens of percent)
REL = 1e-5


@pytest.mark.parametrize("energy", [True, False], ids=["energy", "own-norms"])
@pytest.mark.parametrize(
    "make, sample",
    [(Residual, (3, 8, 8)), (build_subclass_net, (3, 8, 8))],
    ids=["residual-inplace", "conv-subclasses"],
)
def test_a_piece_probed_in_parts_equals_its_parts_as_pieces(
    make: Any, sample: tuple[int, ...], energy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = make().eval()
    calls = _probed_in_parts(monkeypatch)
    split, amax_split, hist_split = _scan_pieces(model, torch.zeros(sample), True, energy)
    assert calls == [True], "the piece was not probed in parts"
    parts, amax_parts, hist_parts = _scan_pieces(model, torch.zeros(sample), False, energy)
    assert calls == [True], "pieces that fit the probes' forward were probed in parts"
    _assert_same(split, parts, REL)
    assert amax_split == pytest.approx(amax_parts, rel=REL)
    for name, counts in hist_parts.items():
        assert float(hist_split[name].sum()) == float(counts.sum())
        assert float((hist_split[name] - counts).abs().sum()) <= 2.0  # a value on a bin edge may move


def test_parts_whose_outputs_do_not_carry_the_samples_run_as_pieces_of_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = SequenceFirst().eval()
    calls = _probed_in_parts(monkeypatch)
    split, amax_split, _ = _scan_pieces(model, torch.zeros(3, 7), whole=True)
    assert calls == [False]
    parts, amax_parts, _ = _scan_pieces(model, torch.zeros(3, 7), whole=False)
    _assert_same(split, parts, 1e-9)
    assert amax_split == amax_parts


def test_grad_parts_dot_each_sample_with_its_own_part() -> None:
    g = torch.Generator().manual_seed(1)
    parts = (torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 1, 5, 4, generator=g))
    d = torch.randn(3, 5, 4, generator=g)
    whole = sample_dots(torch.cat(parts, dim=1), d, 3)
    assert torch.allclose(GradParts(parts).dots(d), whole, rtol=1e-6)
    with pytest.raises(ValueError, match="do not line up"):
        GradParts(parts).dots(torch.randn(4, 5, 4))
