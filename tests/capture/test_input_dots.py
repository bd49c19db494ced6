"""Input variants dotted inside the probes' backward: the same products as the kept input gradients gave,
and no input gradient kept (the memory they held on a LiDAR frame was the scan's largest single part)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sensitivity.capture.dots import sample_dots
from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.probe_signs import ProbeSigns
from sensitivity.capture.probes import probe_gradients
from sensitivity.methods.ranges import InputVariants
from sensitivity.quant.quantizer import TensorQuantizer


class _Net(nn.Module):
    """Conv, in-place ReLU (writes into `a`'s output), conv, flatten, linear: op inputs of three layouts."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 1)
        self.c = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu_(self.a(x))
        return self.c(torch.tanh(self.b(h)).flatten(1))


def _variants(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, InputVariants]:
    """Each layer's input quantizer at its input's max, and two other ranges (one the same as its own)."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = [getattr(model, n).register_forward_pre_hook(lambda m, a, _n=n: inputs.setdefault(_n, a[0]))
             for n in names]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    out = {}
    for n in names:
        top = inputs[n].abs().max()
        base = TensorQuantizer(8, axis=None, unsigned=False)
        base.set_amax(top)
        out[n] = InputVariants(base, {"max": top, "p99.9": top * 0.5, "mse": top * 0.8})
    return out


@pytest.mark.parametrize("probes", [1, 3])
def test_dots_in_the_backward_equal_the_kept_gradients_dotted_after(probes: int) -> None:
    """Reference: every op input's gradient kept (in bfloat16) and dotted with Q_c(x) - Q(x) after the pass.
    In the backward every probe's gradient is rounded through bfloat16 the same way, so the products agree
    up to the order of float32 sums: 1e-4 of the largest product bounds that."""
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(4, 3, 8, 8)
    names = ["a", "b", "c"]
    variants = _variants(model, x, names)
    kept = probe_gradients(model, x, names, OutputSelector(), probes, ProbeSigns(1, x))
    dotted = probe_gradients(model, x, names, OutputSelector(), probes, ProbeSigns(1, x), variants=variants)
    inputs = {
        "a": x,
        "b": torch.relu(model.a(x)),
        "c": torch.tanh(model.b(torch.relu(model.a(x)))).flatten(1),
    }
    for n in names:
        g_in = kept.take(n)[1]
        got = dotted.take_dots(n)
        assert g_in is not None and got is not None
        want = [
            (keys, None if err is None else sample_dots(g_in, err, 4))
            for keys, err in variants[n].errors(inputs[n])
        ]
        assert [k for k, _ in got] == [k for k, _ in want] == [["naive_max"], ["naive_p99.9"], ["naive_mse"]]
        for (_, d), (_, w) in zip(got, want, strict=True):
            if w is None:
                assert d is None
                continue
            assert d is not None and d.shape == (probes, 4)
            torch.testing.assert_close(d, w, rtol=0, atol=1e-4 * float(w.abs().max()))


def test_no_input_gradient_is_kept_and_unlisted_layers_still_get_output_gradients() -> None:
    """With variants, `inp` stays empty (the products are all that remains), and a layer without variants
    (`a`, the first: nothing upstream of it is tapped) still gets its output gradient."""
    torch.manual_seed(0)
    model, x = _Net().eval(), torch.randn(4, 3, 8, 8)
    variants = {"c": _variants(model, x, ["c"])["c"]}
    grads = probe_gradients(
        model, x, ["a", "b", "c"], OutputSelector(), 2, ProbeSigns(1, x), variants=variants
    )
    assert not any(grads.inp.values())
    assert set(grads.inp_dots) == {"c"}
    plain = probe_gradients(model, x, ["a", "b", "c"], OutputSelector(), 2, ProbeSigns(1, x))
    for n in ("a", "b", "c"):
        g, ref = grads.take(n)[0], plain.take(n)[0]
        assert g is not None and ref is not None and torch.equal(g, ref)
