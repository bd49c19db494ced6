"""Calibrators against pytorch-quantization 2.1.3 (max, percentile, entropy, and mse on CPU) and references.

Tolerance: none. Every amax is a histogram edge (or centre, or an observed max) picked by an argmin or a
search, so it either is the same float32 or it is a different bin; the tests require the same float32.
Our histograms are built with the same torch ops as pytorch-quantization's, so bins match exactly too.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from sensitivity.errors import CalibrationDataError, FPModelError
from sensitivity.quant.calibrators import (
    HistogramCalibrator,
    MaxCalibrator,
    NothingCollectedError,
    compute_amax_entropy,
    compute_amax_mse,
    make_calibrator,
)
from sensitivity.quant.calibrators import entropy as entropy_mod
from sensitivity.quant.calibrators import histogram as histogram_mod
from sensitivity.quant.fake import amax_to_scale, fake_quant
from sensitivity.spec import CALIBRATORS

SHAPE = (8, 16, 16, 16)  # 32 Ki values per batch


def _student_t(g: torch.Generator, df: int = 3) -> torch.Tensor:
    z = torch.randn(SHAPE, generator=g)
    chi2 = sum(torch.randn(SHAPE, generator=g) ** 2 for _ in range(df))
    return z / torch.sqrt(chi2 / df)


def make_batches(
    kind: str, seed: int = 0, growth: tuple[float, ...] = (1.0, 1.3, 0.9, 1.6)
) -> list[torch.Tensor]:
    """Activations as layers see them; a scale per batch, so that later batches grow the histogram range."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, s in enumerate(growth):
        if kind == "relu":  # post-ReLU: half-normal with half the values exactly zero
            x = torch.relu(torch.randn(SHAPE, generator=g))
        elif kind == "outliers":  # gaussian with a few outlier channels, as before a LayerNorm/SmoothQuant
            x = torch.randn(SHAPE, generator=g)
            x[:, k::7] *= 20
        elif kind == "heavy":  # heavy-tailed, signed
            x = _student_t(g)
        elif kind == "heavy_pos":  # heavy-tailed, never negative
            x = _student_t(g).abs()
        else:
            raise ValueError(kind)
        out.append(x * s)
    return out


DATASETS = {"relu": True, "outliers": False, "heavy": False, "heavy_pos": True}  # name -> never negative


@pytest.fixture(scope="module")
def pq():
    """pytorch-quantization's calibrators, with its absl chatter silenced."""
    with warnings.catch_warnings():  # its import scripts a function with the deprecated torch.jit
        warnings.simplefilter("ignore", DeprecationWarning)
        pytest.importorskip("pytorch_quantization")
        from pytorch_quantization.calib import histogram, max
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    return histogram, max


def _pq_hist(pq, batches: list[torch.Tensor], num_bins: int = 2048):
    calib = pq[0].HistogramCalibrator(8, None, False, num_bins=num_bins)
    for x in batches:
        calib.collect(x)
    return calib


def _ours(method: str, batches: list[torch.Tensor], num_bits: int = 8, unsigned: bool = False, **kw):
    calib = make_calibrator(method, num_bits, unsigned, **kw)
    for x in batches:
        calib.collect(x)
    return calib


# ---------------------------------------------------------------------------------------------- max
@pytest.mark.parametrize("kind", list(DATASETS))
def test_max_matches_pytorch_quantization(pq, kind: str) -> None:
    batches = make_batches(kind)
    ref = pq[1].MaxCalibrator(8, None, False)
    for x in batches:
        ref.collect(x)
    for unsigned in (False, True) if DATASETS[kind] else (False,):
        amax = _ours("max", batches, unsigned=unsigned).compute_amax()
        assert amax.dtype == torch.float32 and amax.shape == () and amax.device.type == "cpu"
        assert amax.item() == ref.compute_amax().item()
    assert amax.item() == max(x.abs().max().item() for x in batches)


def test_max_unsigned_ignores_negative_side() -> None:
    calib = _ours("max", [torch.tensor([-5.0, 1.0, 2.0])], unsigned=True)
    assert calib.compute_amax().item() == 2.0
    assert _ours("max", [torch.tensor([-5.0, -1.0])], unsigned=True).compute_amax().item() == 0.0
    assert _ours("max", [torch.tensor([-5.0, 2.0])]).compute_amax().item() == 5.0


# ----------------------------------------------------------------------------------- histograms
@pytest.mark.parametrize("kind", list(DATASETS))
def test_histogram_bins_match_pytorch_quantization(pq, kind: str) -> None:
    batches = make_batches(kind)
    ref = _pq_hist(pq, batches)
    hist, edges = _ours("percentile", batches).histogram()
    assert len(edges) > 2049, "the batches should have grown the range"
    assert torch.equal(edges, ref._calib_bin_edges)
    assert torch.equal(hist, ref._calib_hist.double())


def test_histogram_chunked_histc_is_exact(pq, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = make_batches("relu")
    monkeypatch.setattr(histogram_mod, "HISTC_CHUNK", 1000)
    hist, edges = _ours("entropy", batches).histogram()
    ref = _pq_hist(pq, batches)
    assert torch.equal(hist, ref._calib_hist.double())
    assert torch.equal(edges, ref._calib_bin_edges)


@pytest.mark.parametrize("percentile", [99.99, 99.9, 99.0])
@pytest.mark.parametrize("kind", list(DATASETS))
def test_percentile_matches_pytorch_quantization(pq, kind: str, percentile: float) -> None:
    batches = make_batches(kind)
    ref = _pq_hist(pq, batches).compute_amax("percentile", percentile=percentile)
    amax = _ours("percentile", batches, percentile=percentile).compute_amax()
    assert amax.dtype == torch.float32 and amax.shape == ()
    assert amax.item() == ref.item()


def _pq_entropy(pq, batches, num_bits: int, unsigned: bool, num_bins: int) -> float:
    ref = _pq_hist(pq, batches, num_bins)
    hist = ref._calib_hist.int().numpy()
    edges = ref._calib_bin_edges.numpy()
    return pq[0]._compute_amax_entropy(hist, edges, num_bits, unsigned, 1, 128).item()


def test_entropy_matches_pytorch_quantization_2048_bins(pq) -> None:
    batches = make_batches(
        "relu", growth=(1.0, 1.1)
    )  # one growth step, ~2250 bins: ~2 s of its O(bins²) loop
    amax = _ours("entropy", batches).compute_amax()
    assert amax.dtype == torch.float32 and amax.shape == ()
    assert amax.item() == _pq_entropy(pq, batches, 8, False, 2048)


@pytest.mark.parametrize("num_bits", [8, 4])
@pytest.mark.parametrize("kind", list(DATASETS))
def test_entropy_matches_pytorch_quantization(pq, kind: str, num_bits: int) -> None:
    # 384 bins keep pytorch-quantization's loop fast; the range still grows from 384 to ~620 bins.
    batches = make_batches(kind)
    for unsigned in (False, True) if DATASETS[kind] else (False,):
        amax = _ours("entropy", batches, num_bits, unsigned, num_bins=384).compute_amax()
        assert amax.item() == _pq_entropy(pq, batches, num_bits, unsigned, 384)


def test_entropy_termwise_and_expanded_agree() -> None:
    """The O(levels) expansion that shortlists candidates agrees with the term-wise KL to ~1e-12."""
    hist, _ = _ours("entropy", make_batches("heavy")).histogram()
    b = hist.numpy().copy()
    b[0] = b[1]
    cand = np.arange(128, b.size + 1)
    for levels in (8, 128, 256):
        fast = entropy_mod._kl_expanded(b, b.sum(), cand, levels)
        exact = entropy_mod._kl_termwise(b, b.sum(), cand, levels)
        assert np.array_equal(np.isinf(fast), np.isinf(exact))
        finite = np.isfinite(exact)
        assert np.max(np.abs(fast[finite] - exact[finite])) < 1e-11


def _synthetic_hist(case: int) -> np.ndarray:
    rng = np.random.default_rng(case)
    hist = np.zeros(300, dtype=np.int32)
    if case == 0:  # everything in the first bins: KL 0 for every threshold, the last one wins
        hist[:5] = 10
    elif case == 1:  # only the zero bin, which takes its empty neighbour's count: no data left
        hist[0] = 1000
    elif case == 2:  # an empty gap before a tail: thresholds in the gap leave mass in an empty bin (KL inf)
        hist[:150] = 3
        hist[290] = 5
    else:  # sparse, decaying, many empty bins: ties and infinities everywhere
        hist[:] = rng.geometric(0.02, 300) * (rng.random(300) < 0.5) * np.exp(-np.arange(300) / 80)
    return hist


@pytest.mark.parametrize("case", range(6))
def test_entropy_degenerate_histograms_match_pytorch_quantization(pq, case: int) -> None:
    hist = _synthetic_hist(case)
    edges = np.linspace(0, 3, hist.size + 1, dtype=np.float32)
    for num_bits, unsigned in ((8, False), (8, True), (4, False)):
        expected = pq[0]._compute_amax_entropy(hist.copy(), edges, num_bits, unsigned, 1, 128).item()
        assert compute_amax_entropy(hist, edges, num_bits, unsigned).item() == expected


def _mse_reference(hist: torch.Tensor, edges: torch.Tensor, num_bits: int, unsigned: bool) -> float:
    """Brute force: every bin centre from 128 on as amax, fake-quantize the centres, count-weighted error."""
    n = min(hist.numel(), edges.numel() - 1)
    centres = (edges[1 : n + 1] + edges[:n]) / 2
    best, best_err = None, math.inf
    for i in range(128, n):
        scale = amax_to_scale(centres[i], num_bits, unsigned)
        err = (fake_quant(centres, scale, num_bits, unsigned) - centres).double()
        total = float((err * err * hist[:n]).sum())
        if total < best_err:
            best, best_err = centres[i].item(), total
    assert best is not None
    return best


@pytest.mark.parametrize(
    ("kind", "num_bits", "unsigned"),
    [
        ("relu", 8, False),
        ("relu", 4, True),
        ("outliers", 8, False),
        ("heavy", 4, False),
        ("heavy_pos", 8, True),
    ],
)
def test_mse_matches_brute_force(kind: str, num_bits: int, unsigned: bool) -> None:
    batches = make_batches(kind, growth=(1.0, 1.2))
    calib = _ours("mse", batches, num_bits, unsigned)
    hist, edges = calib.histogram()
    assert calib.compute_amax().item() == _mse_reference(hist, edges, num_bits, unsigned)


@pytest.mark.parametrize(("kind", "num_bits", "unsigned"), [("relu", 8, True), ("heavy", 4, False)])
def test_mse_matches_pytorch_quantization_with_cuda_stubbed(
    pq, monkeypatch: pytest.MonkeyPatch, kind: str, num_bits: int, unsigned: bool
) -> None:
    """Its `_compute_amax_mse` calls .cuda(); made a no-op, it runs on CPU (it rounds x·(qmax/amax))."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    batches = make_batches(kind)
    ref = _pq_hist(pq, batches, 512)
    hist = ref._calib_hist.int().numpy()
    edges = ref._calib_bin_edges.numpy()
    n = min(len(hist), len(edges) - 1)  # it cannot handle the rare edges/bins length mismatch
    expected = pq[0]._compute_amax_mse(hist[:n], edges[: n + 1], num_bits, unsigned).item()
    assert compute_amax_mse(hist, edges, num_bits, unsigned).item() == expected


# ------------------------------------------------------------------------------- merge / state
def test_max_merge_is_exact() -> None:
    batches = make_batches("outliers")
    whole = _ours("max", batches)
    a, b = _ours("max", batches[::2]), _ours("max", batches[1::2])
    a.merge_state(b.state())
    assert a.compute_amax().item() == whole.compute_amax().item()
    assert a.reduce_ops() == {"amax": "max"}
    idle = make_calibrator("max", 8, False)  # a rank that saw no batch contributes -inf
    assert idle.state()["amax"].item() == -math.inf
    idle.merge_state(whole.state())
    assert idle.compute_amax().item() == whole.compute_amax().item()


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_fixed_range_merge_is_exact(method: str) -> None:
    batches = make_batches("heavy")
    top = float(_ours("max", batches).compute_amax())  # what a distributed run all-reduces first
    whole = _ours(method, batches, hist_range=top)
    a, b = _ours(method, batches[:1], hist_range=top), _ours(method, batches[1:], hist_range=top)
    state = b.state()
    assert set(state) == set(b.reduce_ops()) == {"hist", "zeros", "max"}
    a.merge_state(state)
    assert torch.equal(a.histogram()[0], whole.histogram()[0])
    assert a.compute_amax().item() == whole.compute_amax().item()


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_fixed_range_equals_pytorch_quantization_on_one_batch(pq, method: str) -> None:
    batches = make_batches("relu")
    top = float(_ours("max", batches).compute_amax())
    ref = _pq_hist(pq, [torch.cat(batches)])
    ours = _ours(method, batches, hist_range=top)
    hist, edges = ours.histogram()
    assert torch.equal(edges, ref._calib_bin_edges)
    assert torch.equal(hist, ref._calib_hist.double())
    if method == "percentile":
        assert ours.compute_amax().item() == ref.compute_amax("percentile").item()
    else:
        h, e = ref._calib_hist.int().numpy(), ref._calib_bin_edges.numpy()
        assert ours.compute_amax().item() == pq[0]._compute_amax_entropy(h, e, 8, False, 1, 128).item()


def test_fixed_range_clamps_values_beyond_it() -> None:
    calib = _ours("percentile", [torch.tensor([0.5, 3.0, -7.0])], hist_range=1.0, num_bins=16)
    hist, _ = calib.histogram()
    assert hist.sum().item() == 3 and hist[-1].item() == 2


def test_fixed_zero_range_and_idle_rank() -> None:
    dead = _ours("entropy", [torch.zeros(10), torch.zeros(3)], hist_range=0.0)
    assert dead.compute_amax().item() == 0.0
    busy = _ours("percentile", make_batches("relu"), hist_range=8.0)
    idle = make_calibrator("percentile", 8, False, hist_range=8.0)
    assert idle.state()["max"].item() == -math.inf and idle.state()["hist"].sum() == 0
    idle.merge_state(busy.state())
    assert idle.compute_amax().item() == busy.compute_amax().item()


def test_growing_merge_is_approximate_and_adoption_exact() -> None:
    batches = make_batches("relu")
    whole = _ours("percentile", batches)
    a, b = _ours("percentile", batches[:2]), _ours("percentile", batches[2:])
    a.merge_state(b.state())
    assert a.histogram()[0].sum().item() == sum(x.numel() for x in batches)
    width = (whole.histogram()[1][1] - whole.histogram()[1][0]).item()
    assert abs(a.compute_amax().item() - whole.compute_amax().item()) <= 2 * width
    with pytest.raises(RuntimeError, match="hist_range"):
        a.reduce_ops()
    empty = make_calibrator("percentile", 8, False)
    empty.merge_state(whole.state())
    assert empty.compute_amax().item() == whole.compute_amax().item()


# ---------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("method", CALIBRATORS)
def test_nothing_collected_raises(method: str) -> None:
    calib = make_calibrator(method, 8, False)
    calib.collect(torch.empty(0, 3))  # an empty tensor is skipped, not an error
    with pytest.raises(NothingCollectedError):
        calib.compute_amax()
    assert issubclass(NothingCollectedError, CalibrationDataError)


@pytest.mark.parametrize("method", CALIBRATORS)
def test_all_zero_activations_give_zero_amax(method: str) -> None:
    calib = make_calibrator(method, 8, True)
    calib.collect(torch.zeros(4, 8))
    assert calib.compute_amax().item() == 0.0


def test_zeros_before_the_first_nonzero_batch_are_counted() -> None:
    calib = _ours("percentile", [torch.zeros(100), torch.linspace(0, 1, 50)])
    hist, edges = calib.histogram()
    assert hist.sum().item() == 150 and hist[0].item() == 101 and edges[-1].item() == 1.0


@pytest.mark.parametrize("hist_range", [None, 2.0])
@pytest.mark.parametrize("method", CALIBRATORS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_activations_raise(method: str, bad: float, hist_range: float | None) -> None:
    calib = make_calibrator(method, 8, False, hist_range=hist_range)
    with pytest.raises(FPModelError):
        calib.collect(torch.tensor([1.0, bad]))
        calib.compute_amax()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", CALIBRATORS)
def test_other_dtypes(method: str, dtype: torch.dtype) -> None:
    x = make_batches("relu")[0]
    ref = _ours(method, [x.to(dtype).float()]).compute_amax()
    amax = _ours(method, [x.to(dtype)]).compute_amax()
    assert amax.dtype == torch.float32 and amax.item() == ref.item()


def test_make_calibrator_validates() -> None:
    with pytest.raises(ValueError, match="unknown calibrator"):
        make_calibrator("kl", 8, False)
    with pytest.raises(ValueError, match="hist_range"):
        make_calibrator("entropy", 8, False, hist_range=-1.0)
    assert isinstance(make_calibrator("max", 8, False), MaxCalibrator)
    calib = make_calibrator("entropy", 4, True, num_bins=512)
    assert isinstance(calib, HistogramCalibrator) and calib.num_bits == 4 and calib.unsigned
    assert "entropy" in repr(calib)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", CALIBRATORS)
def test_collect_on_cuda(method: str) -> None:
    batches = make_batches("relu")
    cpu = _ours(method, batches).compute_amax()
    gpu = _ours(method, [x.cuda() for x in batches]).compute_amax()
    assert gpu.device.type == "cpu"
    width = (cpu / 2048).item()  # CUDA's histc may put a value on a bin boundary in the next bin
    assert abs(gpu.item() - cpu.item()) <= 2 * width
