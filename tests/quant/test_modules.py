"""Quantized layers equal F.conv*/F.linear on explicitly fake-quantized input and weight."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sensitivity.quant.fake import amax_to_scale, fake_quant
from sensitivity.quant.modules import QUANT_MODULES
from sensitivity.quant.registry import quant_class_for
from sensitivity.spec import QuantSpec

CASES = [
    (nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), (2, 4, 9, 9)),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4), (2, 4, 9, 9)),
    (nn.Conv3d(3, 5, 3, padding=1), (1, 3, 5, 6, 7)),
    (nn.ConvTranspose2d(4, 6, 2, stride=2), (2, 4, 5, 5)),
    (nn.ConvTranspose3d(3, 2, 3, stride=2, padding=1, output_padding=1), (1, 3, 3, 4, 4)),
    (nn.Linear(7, 3), (5, 7)),
]


def _reference(mod: nn.Module, x: torch.Tensor, spec: QuantSpec, act_amax: torch.Tensor) -> torch.Tensor:
    axis = 1 if isinstance(mod, nn.modules.conv._ConvTransposeNd) else 0
    dims = [d for d in range(mod.weight.dim()) if d != axis]
    w_amax = mod.weight.abs().amax(dim=dims)
    wq = fake_quant(mod.weight, amax_to_scale(w_amax, spec.w_bits, False), spec.w_bits, False, axis)
    xq = fake_quant(x, amax_to_scale(act_amax, spec.a_bits, False), spec.a_bits, False)
    clone = copy.deepcopy(mod)
    with torch.no_grad():
        clone.weight.copy_(wq)
    return clone(xq)


@pytest.mark.parametrize("spec", [QuantSpec(), QuantSpec.parse("W4A8"), QuantSpec.parse("W8A4")], ids=str)
@pytest.mark.parametrize(("mod", "shape"), CASES, ids=[type(m).__name__ for m, _ in CASES])
def test_quant_layer_matches_reference(mod: nn.Module, shape: tuple[int, ...], spec: QuantSpec) -> None:
    mod = mod.eval()
    x = torch.randn(shape)
    amax = x.abs().max()
    qmod = quant_class_for(mod).from_float(copy.deepcopy(mod), spec)  # type: ignore[union-attr]
    qmod.input_quantizer.set_amax(amax)
    assert isinstance(qmod, type(mod))
    with torch.no_grad():
        torch.testing.assert_close(qmod(x), _reference(mod, x, spec, amax), rtol=0, atol=0)
        qmod.input_quantizer.enabled = False
        qmod.weight_quantizer.enabled = False
        torch.testing.assert_close(qmod(x), mod(x), rtol=0, atol=0)


def test_from_float_keeps_state_dict_keys_and_shares_parameters() -> None:
    conv = nn.Conv2d(3, 4, 3)
    q = QUANT_MODULES[nn.Conv2d].from_float(conv, QuantSpec())
    q.input_quantizer.set_amax(1.0)
    keys = set(q.state_dict())
    assert {"weight", "bias"} <= keys
    assert {"input_quantizer.amax", "weight_quantizer.amax"} <= keys
    assert q.weight is conv.weight
    assert q.weight_quantizer.amax.shape == (4,)


def test_weight_cache_follows_weight_changes() -> None:
    lin = nn.Linear(4, 4)
    q = QUANT_MODULES[nn.Linear].from_float(copy.deepcopy(lin), QuantSpec())
    q.input_quantizer.set_amax(3.0)
    x = torch.randn(2, 4)
    with torch.no_grad():
        y1 = q(x)
        q.weight.mul_(2)  # in-place change bumps the version: the cached quantized weight must refresh
        q.weight_quantizer.set_amax(q.weight.abs().amax(dim=1))
        y2 = q(x)
    assert not torch.allclose(y1, y2)


def test_unsigned_activation_uses_full_uint_range() -> None:
    conv = nn.Conv2d(2, 2, 1, bias=False)
    q = QUANT_MODULES[nn.Conv2d].from_float(copy.deepcopy(conv), QuantSpec(), act_unsigned=True)
    q.input_quantizer.set_amax(255.0)
    x = torch.arange(0, 256, dtype=torch.float32).view(1, 2, 8, 16)
    # scale 1 with uint8 codes: every integer input in [0, 255] is represented exactly
    torch.testing.assert_close(q.input_quantizer(x), x, rtol=0, atol=0)
    q.input_quantizer.unsigned = False
    assert (q.input_quantizer(x) - x).abs().max() > 0.5
