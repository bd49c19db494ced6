"""Range candidates score Q_c(x) - Q(x): one quantization per distinct amax, none for the layer's own."""

from __future__ import annotations

import torch

from sensitivity.methods.ranges import InputVariants
from sensitivity.quant.quantizer import TensorQuantizer


def _quantizer(amax: float) -> TensorQuantizer:
    q = TensorQuantizer(8, axis=None, unsigned=False)
    q.set_amax(torch.tensor(amax))
    return q


def test_equal_ranges_share_one_difference_and_the_own_range_none() -> None:
    base = _quantizer(4.0)
    amaxes = {"max": torch.tensor(4.0), "p99.999": torch.tensor(4.0), "p99.9": torch.tensor(2.0),
              "p99.99": torch.tensor(2.0), "mse": torch.tensor(3.0)}  # fmt: skip
    x = torch.linspace(-5, 5, 101)
    out = list(InputVariants(base, amaxes).errors(x))
    assert out[0] == (["naive_max", "naive_p99.999"], None)
    rest = {tuple(keys): diff for keys, diff in out[1:]}
    assert set(rest) == {("naive_p99.9", "naive_p99.99"), ("naive_mse",)}
    for keys, amax in ((("naive_p99.9", "naive_p99.99"), 2.0), (("naive_mse",), 3.0)):
        expected = _quantizer(amax)(x) - base(x)
        assert torch.equal(rest[keys], expected)
