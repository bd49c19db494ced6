"""The probes' random signs: per sample wherever a piece is a batch of samples, so a sample draws the same
signs alone, in a part or in the whole piece (and so the output-referred estimates do not depend on the cut)."""

from __future__ import annotations

import pytest
import torch

from sensitivity.capture.probe_signs import ProbeSigns


def _draws(signs: ProbeSigns, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Several draws in a row, as the probes make them (one per output, one round per probe)."""
    return [signs.draw(torch.zeros(shape)) for shape in shapes]


@pytest.mark.parametrize("cut", [1, 2, 3])
@pytest.mark.parametrize("as_tuple", [False, True])
def test_a_sample_draws_the_same_signs_in_any_piece(cut: int, as_tuple: bool) -> None:
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    whole_batch = (x, mask) if as_tuple else x
    rounds = [(6, 10), (6, 2, 3), (6, 10), (6, 2, 3)]  # two probes over two outputs
    whole = _draws(ProbeSigns(7, whole_batch), rounds)
    for start in range(0, 6, cut):
        stop = min(start + cut, 6)
        piece = (x[start:stop], mask[start:stop]) if as_tuple else x[start:stop]
        got = _draws(ProbeSigns(7, piece), [(stop - start, *s[1:]) for s in rounds])
        for g, w in zip(got, whole, strict=True):
            assert torch.equal(g, w[start:stop])


def test_signs_are_plus_minus_one_in_the_outputs_dtype_and_depend_on_seed_and_content() -> None:
    x = torch.randn(4, 8)
    a = ProbeSigns(0, x).draw(torch.zeros(4, 1000, dtype=torch.float64))
    assert a.dtype == torch.float64
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    assert 0.4 < float((a > 0).double().mean()) < 0.6
    assert torch.equal(a, ProbeSigns(0, x.clone()).draw(torch.zeros(4, 1000, dtype=torch.float64)))
    assert not torch.equal(a, ProbeSigns(1, x).draw(torch.zeros(4, 1000, dtype=torch.float64)))
    y = x.clone()
    y[2, 0] += 1.0  # one sample changed: its own signs change, the others' stay
    b = ProbeSigns(0, y).draw(torch.zeros(4, 1000, dtype=torch.float64))
    assert torch.equal(a[[0, 1, 3]], b[[0, 1, 3]]) and not torch.equal(a[2], b[2])


def test_each_sample_draws_from_its_own_content() -> None:
    rows = ProbeSigns(0, torch.randn(3, 5)).draw(torch.zeros(3, 4096))
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2])
    same = ProbeSigns(0, torch.zeros(3, 5)).draw(torch.zeros(3, 64))
    assert torch.equal(same[0], same[1])  # equal samples draw equal signs, wherever they sit


def test_outputs_not_along_the_batch_and_unsplittable_batches_draw_from_the_piece() -> None:
    x = torch.randn(4, 8)
    signs = ProbeSigns(3, x)
    boxes = signs.draw(torch.zeros(17, 7))  # dim 0 is not the batch: one draw for the piece
    assert boxes.shape == (17, 7)
    again = ProbeSigns(3, x).draw(torch.zeros(17, 7))
    assert torch.equal(boxes, again)
    frames = {"points": torch.randn(100, 4), "batch_size": 2}  # a dict batch: never cut, drawn per piece
    d = ProbeSigns(3, frames)
    assert d.samples is None
    assert torch.equal(d.draw(torch.zeros(2, 9)), ProbeSigns(3, frames).draw(torch.zeros(2, 9)))
