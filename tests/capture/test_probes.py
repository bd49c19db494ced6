"""Output probes against the exact Jacobian: E_r[(rᵀ J δ)²] = ‖J δ‖², per sample, through in-place ops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sensitivity.capture.dots import sample_dots
from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.probe_signs import ProbeSigns
from sensitivity.capture.probes import probe_gradients


class _Mlp(nn.Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, 12)
        self.act = nn.Tanh()
        self.b = nn.Linear(12, 8)
        self.relu = nn.ReLU(inplace=inplace)
        self.c = nn.Linear(8, 3)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.relu(self.b(self.act(self.a(x)))))


def _rest(model: _Mlp, layer: str):  # the network after `layer`, as a function of its output
    if layer == "a":
        return lambda y: model.c(torch.relu(model.b(torch.tanh(y))))
    if layer == "b":
        return lambda y: model.c(torch.relu(y))
    return lambda y: y


def test_sample_dots_group_by_sample_only_where_dim0_is_the_batch() -> None:
    g = torch.randn(2, 4, 5)
    d = torch.randn(4, 5)
    torch.testing.assert_close(sample_dots(g, d, 4), torch.einsum("kgn,gn->kg", g, d).double())
    torch.testing.assert_close(sample_dots(list(g), d, 4), sample_dots(g, d, 4))  # K tensors or one
    whole = sample_dots(g, d, 7)  # dim 0 is not the batch: one group
    torch.testing.assert_close(whole, (g * d).sum(dim=(1, 2)).double().unsqueeze(1))


@pytest.mark.parametrize("inplace", [False, True])
def test_probe_estimate_matches_the_exact_jacobian(inplace: bool) -> None:
    """Mean over probes and samples of (g·δ)² vs Σ_n ‖J_n δ_n‖² / ‖y‖² from autograd's Jacobian. With K
    Rademacher probes on N samples the relative standard error is at most sqrt(2 / (K N)) = 2.5 % here; the
    tolerance is 4 of those. ReLU(inplace=True) after `b` must not change what the gradient refers to."""
    model = _Mlp(inplace).eval()
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(1))
    probes = 100
    grads = probe_gradients(model, x, ["a", "b", "c"], OutputSelector(), probes, ProbeSigns(2, x))
    y = model(x)
    norm2 = float((y.double() ** 2).sum())
    for layer in ("a", "b", "c"):
        g_out, g_in = grads.take(layer)
        assert g_out is not None and g_in is not None
        out = getattr(model, layer)(
            {"a": x, "b": torch.tanh(model.a(x)), "c": torch.relu(model.b(torch.tanh(model.a(x))))}[layer]
        )
        delta = 1e-3 * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        rest = _rest(model, layer)
        exact = 0.0
        for n in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(rest, out[n : n + 1]).reshape(3, -1).double()
            exact += float((jac @ delta[n].double()).norm() ** 2)
        exact /= norm2
        dots = sample_dots(g_out, delta, grads.samples)
        estimate = float((dots**2).sum()) / probes
        assert estimate == pytest.approx(exact, rel=4 * math.sqrt(2 / (probes * x.shape[0])))


def test_input_gradient_is_the_layer_input_gradient() -> None:
    """g at the op input = Wᵀ g at the output for a Linear layer (what the calibrator ranges are dotted with)."""
    model = _Mlp().eval()
    x = torch.randn(8, 6)
    grads = probe_gradients(model, x, ["b"], OutputSelector(), 2, ProbeSigns(0, x))
    g_out, g_in = grads.take("b")
    assert g_out is not None and g_in is not None
    assert g_in.shape[0] == g_out.shape[0] == 2  # [K, *shape]: one row per probe
    # both are kept in bfloat16 (8 significant bits): equal to within its rounding of each
    torch.testing.assert_close(g_in, g_out @ model.b.weight, rtol=2e-2, atol=1e-3)


class _Blocked(nn.Module):
    """`a` feeds the output only through `.detach()`, `b` only through `round` (zero gradient), `c` through
    a `no_grad` block; `d` normally."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x).detach()
        b = torch.round(self.b(x) * 4) / 4
        with torch.no_grad():
            c = self.c(x)
        return self.d(x) + a + b + c


def test_blocked_layers_get_no_or_zero_gradient() -> None:
    model = _Blocked().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 4)
    grads = probe_gradients(model, x, ["a", "b", "c", "d"], OutputSelector(), 1, ProbeSigns(0, x))
    assert grads.take("a")[0] is None
    g_b = grads.take("b")[0]
    assert g_b is not None and not any(g.any() for g in g_b)
    assert grads.take("c")[0] is None
    g_d = grads.take("d")[0]
    assert g_d is not None and sum(g.abs().sum() for g in g_d) > 0


def test_automatic_probe_count_follows_the_samples_and_the_memory_budget() -> None:
    from sensitivity import ScanOptions

    auto = ScanOptions()
    assert [auto.probe_count(n) for n in (1, 2, 3, 4, 100)] == [4, 2, 2, 1, 1]
    budget = auto.stored_activation_mb
    # one sample's layer outputs: each probe holds one more copy, beside the FP outputs and autograd's 2
    assert auto.probe_count(1, budget / 6.5) == 3
    assert auto.probe_count(1, budget / 5.5) == 2
    assert auto.probe_count(1, budget / 4.5) == 1
    assert auto.probe_count(1, 4 * budget) == 1  # never below one (0 would turn the scores off)
    assert auto.probe_count(1, budget / 100) == 4  # small samples: the sample count decides
    assert ScanOptions(probes=4).probe_count(1, 4 * budget) == 4  # asked for: as asked


def test_a_sample_too_large_for_the_budget_gets_one_probe() -> None:
    """Pieces are never cut below one sample; a LiDAR frame's probes once took the real OpenPCDet scan's
    peak from 4.0 to 6.1 GiB at 4 probes."""
    from sensitivity import ScanOptions, scan
    from tests.models import TinyConvNet

    torch.manual_seed(0)
    batches = [torch.randn(1, 3, 16, 16) for _ in range(2)]  # one held-out sample: 4 probes by default
    sources = {}
    for budget in (64.0, 0.01):  # TinyConvNet's layer outputs: about 0.03 MiB a sample
        result = scan(TinyConvNet().eval(), batches, ScanOptions(stored_activation_mb=budget))
        sources[budget] = set(result.table["out_err_source"])
    assert sources == {64.0: {"probe (4 x 1 samples)"}, 0.01: {"probe (1 x 1 samples)"}}
