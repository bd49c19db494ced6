"""Fake quantization against ONNX Runtime (exact), pytorch-quantization and torch (equal except at .5 ties).

ONNX Runtime's QuantizeLinear computes saturate(round_half_even(x / scale)); `fake_quant` must reproduce
its Q -> DQ output bit for bit in value (atol=0). pytorch-quantization rounds x·(qmax / amax) and torch's
fake_quantize ops x·(1 / scale): one extra rounding, so they may pick the other code where x / scale is
within a few float32 ulps of a .5 tie, and nowhere else. The inputs are built to contain such points.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sensitivity.quant.fake import amax_to_scale, fake_quant, quantize_codes
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.spec import qrange

AMAX = [1.0, 3.7, 0.0123, 4.0]  # 4.0: scale = 4/127 is no power of two; with unsigned 4/255


def _candidates(scale: float, unsigned: bool, rng: np.random.Generator) -> np.ndarray:
    """Ties (k + .5)·scale and their float32 neighbours, random values, saturation, zeros of both signs."""
    s = np.float32(scale)
    qmin, qmax = qrange(8, unsigned)
    k = np.arange(qmin - 4, qmax + 4, dtype=np.float32)
    ties = (k + np.float32(0.5)) * s
    exact = (k + np.float32(0.5)) * np.float32(2.0**-6)  # a power-of-two scale makes these exact ties
    parts = [
        ties,
        np.nextafter(ties, np.float32(np.inf)),
        np.nextafter(ties, np.float32(-np.inf)),
        exact,
        (rng.standard_normal(20000) * 60 * s).astype(np.float32),
        (ties[:, None] * (1 + rng.integers(-8, 9, (ties.size, 8)) * np.float32(2.0**-24))).ravel(),
        np.array([0.0, -0.0, -1e-30, 1e-30, -1e-45, 1e-45, -0.49 * s, 0.49 * s], dtype=np.float32),
        np.array([1e3 * s, -1e3 * s, 1e30, -1e30, np.inf, -np.inf], dtype=np.float32),
        np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max], dtype=np.float32),
    ]
    return np.concatenate(parts).astype(np.float32)


def _near_tie(x: torch.Tensor, scale: torch.Tensor, ulps: int = 4) -> torch.Tensor:
    """x / scale (computed exactly enough in float64) within `ulps` float32 ulps of a .5 tie."""
    r = x.double() / scale.double()
    dist = (r - torch.floor(r) - 0.5).abs()
    ulp = torch.from_numpy(np.spacing(np.abs(r.numpy()))) * 2.0**29  # float32 has 29 fewer mantissa bits
    return torch.isfinite(r) & (dist <= ulps * ulp)


# ----------------------------------------------------------------------------------------- ORT
def _qdq_session(shape: tuple[int, ...], scale: np.ndarray, unsigned: bool, axis: int | None, opset: int):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    zp = np.zeros(scale.shape, dtype=np.uint8 if unsigned else np.int8)
    attrs = {} if axis is None else {"axis": axis}
    qtype = TensorProto.UINT8 if unsigned else TensorProto.INT8
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
            helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape)),
            helper.make_tensor_value_info("q", qtype, list(shape)),
        ],
        initializer=[numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zp, "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["y", "q"], {"x": x})


def _check_against_ort(
    x: np.ndarray, scale: np.ndarray, unsigned: bool, axis: int | None, opset: int
) -> None:
    y_ort, q_ort = _qdq_session(x.shape, scale, unsigned, axis, opset)(x)
    xt, st = torch.from_numpy(x), torch.from_numpy(scale)
    y = fake_quant(xt, st, 8, unsigned, axis)
    q = quantize_codes(xt, st, 8, unsigned, axis)
    assert torch.equal(q, torch.from_numpy(q_ort.astype(np.float32)))
    assert torch.equal(y, torch.from_numpy(y_ort))  # value equality, atol=0 (+0 == -0)
    # The one representational difference: ORT's dequantized zero is +0, ours keeps the sign of x / scale.
    sign_differs = torch.signbit(y) != torch.from_numpy(np.signbit(y_ort))
    assert torch.all(y[sign_differs] == 0)
    assert torch.all(torch.signbit(y[sign_differs]))
    # The inputs must tell ORT's x / scale from torch's x * (1 / scale), or this test would prove nothing.
    qmin, qmax = qrange(8, unsigned)
    by_reciprocal = torch.clamp(torch.round(xt * (1 / _per_axis(st, xt, axis))), qmin, qmax)
    assert (by_reciprocal != q).any()


def _per_axis(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("amax", AMAX)
def test_per_tensor_matches_onnxruntime(amax: float, unsigned: bool, opset: int) -> None:
    scale = amax_to_scale(torch.tensor(amax), 8, unsigned).numpy()
    x = _candidates(float(scale), unsigned, np.random.default_rng(0))
    _check_against_ort(x, scale, unsigned, None, opset)


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_matches_onnxruntime(axis: int, unsigned: bool, opset: int) -> None:
    rng = np.random.default_rng(1)
    scales = amax_to_scale(torch.tensor([*AMAX, 0.7, 12.5]), 8, unsigned).numpy()
    cols = [_candidates(float(s), unsigned, rng) for s in scales]
    n = min(len(c) for c in cols)
    x = np.stack([c[:n] for c in cols], axis=axis)  # channel c along `axis` holds its own ties
    x = np.ascontiguousarray(x[..., None, None] if axis == 0 else x[:, :, None])
    _check_against_ort(x, scales, unsigned, axis, opset)


def test_nan_differs_from_onnxruntime_by_design() -> None:
    """ORT (and torch's fake_quantize) turn NaN into the lowest code; `fake_quant` keeps NaN visible."""
    scale = np.array(0.1, dtype=np.float32)
    y_ort, _ = _qdq_session((1,), scale, False, None, 13)(np.array([np.nan], dtype=np.float32))
    assert np.isfinite(y_ort).all()
    assert torch.isnan(fake_quant(torch.tensor([float("nan")]), torch.from_numpy(scale), 8)).all()


# ------------------------------------------------------------------------- pytorch-quantization
@pytest.fixture(scope="module")
def tensor_quant():
    with warnings.catch_warnings():  # its import scripts a function with the deprecated torch.jit
        warnings.simplefilter("ignore", DeprecationWarning)
        pytest.importorskip("pytorch_quantization")
        from pytorch_quantization.tensor_quant import tensor_quant
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    return tensor_quant


def _assert_only_ties_differ(
    ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor, scale: torch.Tensor
) -> int:
    differ = ours != theirs
    assert torch.all(_near_tie(x, scale)[differ]), "codes differ away from a .5 tie"
    assert torch.all((ours - theirs).abs()[differ] == 1)
    return int(differ.sum())


@pytest.mark.parametrize("unsigned", [False, True])
def test_codes_match_pytorch_quantization_except_ties(tensor_quant, unsigned: bool) -> None:
    rng = np.random.default_rng(2)
    total = 0
    for amax in AMAX:
        amax_t = torch.tensor(amax)
        scale = amax_to_scale(amax_t, 8, unsigned)
        x = torch.from_numpy(_candidates(float(scale), unsigned, rng))
        x = x[x >= 0] if unsigned else x  # it refuses negative inputs to unsigned quantization
        theirs, _ = tensor_quant(x, amax_t, 8, unsigned, False)  # narrow_range=False: the full int8 range
        ours = quantize_codes(x, scale, 8, unsigned)
        total += _assert_only_ties_differ(ours, theirs, x, scale.expand_as(x))
    assert total > 0, "the inputs should include ties where the two roundings part"


def test_per_channel_codes_match_pytorch_quantization_except_ties(tensor_quant) -> None:
    rng = np.random.default_rng(3)
    amax = torch.tensor(AMAX)
    scale = amax_to_scale(amax, 8, False)
    cols = [_candidates(float(s), False, rng) for s in scale]
    n = min(len(c) for c in cols)
    x = torch.from_numpy(np.stack([c[:n] for c in cols]))  # [C, n], axis 0
    theirs, _ = tensor_quant(x, amax[:, None], 8, False, False)
    ours = quantize_codes(x, scale, 8, False, axis=0)
    assert _assert_only_ties_differ(ours, theirs, x, scale[:, None].expand_as(x)) > 0


# ---------------------------------------------------------------------------------------- torch
def _finite_for_torch(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # torch casts x / scale to int64 before clamping: beyond 2^62 (and at inf) the cast overflows and
    # fake_quantize_per_channel_affine saturates +1e30 to the lowest code. Not what we compare here.
    return torch.isfinite(x) & ((x.double() / scale.double()).abs() < 2.0**62)


@pytest.mark.parametrize("unsigned", [False, True])
def test_matches_torch_fake_quantize_per_tensor_except_ties(unsigned: bool) -> None:
    rng = np.random.default_rng(4)
    qmin, qmax = qrange(8, unsigned)
    total = 0
    for amax in AMAX:
        scale = amax_to_scale(torch.tensor(amax), 8, unsigned)
        x = torch.from_numpy(_candidates(float(scale), unsigned, rng))
        x = x[_finite_for_torch(x, scale)]
        theirs = torch.fake_quantize_per_tensor_affine(x, float(scale), 0, qmin, qmax)
        ours = fake_quant(x, scale, 8, unsigned)
        codes = [torch.round(y / scale) for y in (ours, theirs)]
        total += _assert_only_ties_differ(*codes, x, scale.expand_as(x))
    assert total > 0


@pytest.mark.parametrize("unsigned", [False, True])
def test_matches_torch_fake_quantize_per_channel_except_ties(unsigned: bool) -> None:
    rng = np.random.default_rng(5)
    qmin, qmax = qrange(8, unsigned)
    scale = amax_to_scale(torch.tensor(AMAX), 8, unsigned)
    cols = [_candidates(float(s), unsigned, rng) for s in scale]
    n = min(len(c) for c in cols)
    x = torch.from_numpy(np.stack([c[:n] for c in cols], axis=1))  # [n, C], axis 1
    keep = _finite_for_torch(x, scale[None, :]).all(dim=1)
    x = x[keep]
    zero = torch.zeros(len(AMAX), dtype=torch.int32)
    theirs = torch.fake_quantize_per_channel_affine(x, scale, zero, 1, qmin, qmax)
    ours = fake_quant(x, scale, 8, unsigned, axis=1)
    s = scale[None, :].expand_as(x)
    assert _assert_only_ties_differ(torch.round(ours / s), torch.round(theirs / s), x, s) > 0


def test_quantizer_scale_follows_every_change_of_amax_bits_and_sign() -> None:
    """The cached scale is the formula's for whatever the quantizer holds now: a new amax (even one that
    reuses the old tensor's memory), an amax written in place, other bits, the other sign."""
    q = TensorQuantizer(8)
    x = torch.linspace(-3.0, 3.0, 101)

    def check() -> None:
        assert q.amax is not None
        assert torch.equal(q.scale(), amax_to_scale(q.amax, q.num_bits, q.unsigned))
        assert torch.equal(
            q(x), fake_quant(x, amax_to_scale(q.amax, q.num_bits, q.unsigned), q.num_bits, q.unsigned)
        )

    for amax in (2.0, 1.0, 2.0, 0.5):  # set_amax makes a new tensor each time (freed ones may be reused)
        q.set_amax(amax)
        check()
    assert q.amax is not None
    q.amax.mul_(3.0)
    check()
    q.num_bits = 4
    check()
    q.unsigned = True
    check()
