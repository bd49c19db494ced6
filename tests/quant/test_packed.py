"""The fake-quantized weight cached as integer codes: widened, bit-identical to the quantizer's own output
(the atol=0 ONNX Runtime tests rest on that), for every layout and bit width; float32 where codes cannot
hold it (NaN, more than 8 bits)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sensitivity.quant.build import ActQuant, build_quant_model, quant_layers
from sensitivity.quant.modules import QuantMixin
from sensitivity.quant.packed import PackedWeight, pack_weight
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.spec import QuantSpec


def _quantizer(w: torch.Tensor, bits: int, axis: int | None, unsigned: bool = False) -> TensorQuantizer:
    q = TensorQuantizer(bits, axis=axis, unsigned=unsigned)
    if axis is None:
        q.set_amax(w.abs().max())
    else:
        dims = [d for d in range(w.dim()) if d != axis]
        q.set_amax(w.abs().amax(dim=dims) * 0.7)  # some values saturate
    return q


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (8, 1, 3, 3), (10, 12), (6, 4, 3), (4, 4, 2, 2, 2)])
@pytest.mark.parametrize("axis", [None, 0, 1])
@pytest.mark.parametrize(("bits", "unsigned"), [(8, False), (4, False), (2, False), (8, True)])
def test_widened_codes_equal_the_quantizer_bit_for_bit(
    shape: tuple[int, ...], axis: int | None, bits: int, unsigned: bool
) -> None:
    g = torch.Generator().manual_seed(sum(shape) + bits)
    w = torch.randn(shape, generator=g) * 0.3
    w[0].fill_(0.0)  # a dead channel (scale 1)
    if unsigned:
        w = w.abs()
    q = _quantizer(w, bits, axis, unsigned)
    packed = pack_weight(q, w)
    assert isinstance(packed, PackedWeight)
    assert packed.codes.dtype == (torch.uint8 if unsigned else torch.int8)
    assert torch.equal(packed.widened(), q(w))


@pytest.mark.parametrize(
    "bad", [(float("nan"),), (float("inf"),), (float("-inf"),), (float("inf"), float("-inf"))]
)
def test_non_finite_or_wide_weights_stay_float(bad: tuple[float, ...]) -> None:
    w = torch.randn(4, 3)
    q = _quantizer(w, 8, 0)
    for j, value in enumerate(bad):  # +inf and -inf together: their sum is NaN, not a finite number
        w[1, j] = value
    kept = pack_weight(q, w)
    assert isinstance(kept, torch.Tensor)
    torch.testing.assert_close(kept, q(w), equal_nan=True, rtol=0, atol=0)
    wide = _quantizer(w.nan_to_num(), 16, 0)
    assert isinstance(pack_weight(wide, w.nan_to_num()), torch.Tensor)


def _quant_layers(seed: int) -> list[QuantMixin]:
    """The quantized layers of a small conv model (seeded weights, fixed activation ranges)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    qmodel = build_quant_model(
        model, {"0": ActQuant(torch.tensor(2.0)), "2": ActQuant(torch.tensor(1.0))}, QuantSpec()
    )
    return list(quant_layers(qmodel).values())


def test_a_quantized_layer_caches_codes_and_returns_its_fake_quantized_weight() -> None:
    for layer in _quant_layers(seed=0):
        first = layer.quantized_weight()
        assert torch.equal(first, layer.weight_quantizer(layer.weight.detach()))
        assert layer._wq_cache is not None and isinstance(layer._wq_cache[1], PackedWeight)
        first.mul_(0.0)  # a caller changing what it got does not change the cache
        assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight.detach()))
        layer.weight_quantizer.set_amax(layer.weight_quantizer.amax * 0.5)  # a new amax: recomputed
        assert torch.equal(layer.quantized_weight(), layer.weight_quantizer(layer.weight.detach()))


def test_finite_weights_whose_sum_overflows_float32_are_still_exact() -> None:
    """The finiteness test is one float32 sum: a finite weight can overflow it (values near 3e38), and then
    takes the float path, the quantizer's own output, so the values are right either way."""
    w = torch.full((4, 3), 3e38)
    w[0] = -1.0
    q = _quantizer(w, 8, 0)
    got = pack_weight(q, w)
    assert isinstance(got, torch.Tensor) and torch.equal(got, q(w))


def test_a_swapped_setting_gets_its_weight_unpacked_and_leaves_the_cache_alone() -> None:
    """Inside `swapped` (a candidate's setting, one call) the weight is the quantizer's float output, not
    packed or cached; the layer's own cached codes are back after the block."""
    for layer in _quant_layers(seed=1):
        own = layer.quantized_weight()
        cache = layer._wq_cache
        x_absmax = torch.rand(layer.weight.shape[1]) + 0.5
        smoother, amax, w_amax, _ = layer.smoothing_setting(x_absmax, 0.5)
        with layer.swapped(smoother, amax, w_amax):
            inside = layer.quantized_weight()
            assert layer._wq_cache is None
            assert torch.equal(inside, layer.weight_quantizer(layer.smoothed_weight()))
        assert layer._wq_cache is cache and not layer._wq_transient
        assert torch.equal(layer.quantized_weight(), own)
