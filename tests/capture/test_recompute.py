"""A piece whose layer outputs alone exceed the memory budget (one LiDAR frame): the probes' forward keeps no
output of the layers with torch's own forward, the replay computes them again, and every number is the one
the kept outputs give."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef  # storage liveness, not the tensor object

from sensitivity.capture import passes
from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.passes import PassResult, compare_pass
from sensitivity.capture.probe_signs import ProbeSigns
from sensitivity.capture.probes import probe_gradients
from sensitivity.capture.recorded import RecordedForward, recomputable
from tests.capture.test_replay import scan_setup
from tests.subclass_models import Conv2dSame


class Chain(nn.Module):
    """Two plain convs (one written into in place after the call) and a conv subclass with a forward of its
    own, whose output must stay kept."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.same = Conv2dSame(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        h = h + torch.relu_(self.b(h))
        return self.same(h)


def test_only_torch_own_forwards_are_recomputed() -> None:
    own = nn.Conv2d(2, 2, 1)
    own.forward = lambda x: x  # type: ignore[method-assign]
    assert recomputable(nn.Conv2d(2, 2, 1)) and recomputable(nn.Linear(2, 2))
    assert recomputable(nn.ConvTranspose2d(2, 2, 2)) and recomputable(nn.Conv1d(2, 2, 1))
    assert not recomputable(Conv2dSame(2, 2, 3)) and not recomputable(own) and not recomputable(nn.ReLU())


def _pass(monkeypatch: pytest.MonkeyPatch, recompute: bool) -> PassResult:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1, 3, 12, 12, generator=g) for _ in range(3)]
    prep, obs, qmodel, cands, variants, hists = scan_setup(Chain().eval(), batches)
    if not recompute:
        monkeypatch.setattr(passes, "over_budget", lambda *args: False)
    recomputed: list[str] = []
    real = RecordedForward.intact
    monkeypatch.setattr(
        RecordedForward,
        "intact",
        lambda self: recomputed.extend(c.name for c in self.calls if c.out is None) or real(self),
    )
    res = compare_pass(
        prep.model, qmodel, prep.layers, batches[2:], candidates=cands, variants=variants, observers=obs,
        histograms=hists, probes=2, stored_budget_mb=1e-6,
    )  # fmt: skip
    monkeypatch.undo()
    assert set(recomputed) == ({"a", "b"} if recompute else set())
    return res


def test_recomputed_outputs_give_every_number_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _pass(monkeypatch, recompute=True)
    kept = _pass(monkeypatch, recompute=False)
    assert fast.iso.keys() == kept.iso.keys() and len(kept.iso) > 0
    for key in kept.iso:
        assert fast.iso[key].metrics() == pytest.approx(kept.iso[key].metrics(), rel=0, abs=0, nan_ok=True)
    for name in kept.cum:
        assert fast.cum[name].metrics() == pytest.approx(kept.cum[name].metrics(), rel=0, abs=0, nan_ok=True)
    assert fast.pred.keys() == kept.pred.keys() and len(kept.pred) > 0
    for key in kept.pred:
        assert fast.predicted(*key) == kept.predicted(*key)


def _probe(recompute: frozenset[str]) -> tuple[dict[str, bool], RecordedForward, dict[str, torch.Tensor]]:
    """Which layer outputs' memory is still held once the forward is done (before the backward), the recorded
    forward, and each layer's output as the forward computed it."""
    torch.manual_seed(0)
    model = Chain().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    refs: dict[str, Any] = {}
    values: dict[str, torch.Tensor] = {}
    for name in ("a", "b", "same"):

        def hook(m: nn.Module, a: tuple, out: torch.Tensor, _n: str = name) -> None:
            refs[_n], values[_n] = StorageWeakRef(out.untyped_storage()), out.detach().clone()

        model.get_submodule(name).register_forward_hook(hook)
    alive: dict[str, bool] = {}

    def on_forward(flat: dict, forward: RecordedForward | None) -> None:
        alive.update({n: not r.expired() for n, r in refs.items()})

    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    grads = probe_gradients(
        model, x, ["a", "b", "same"], OutputSelector(), 2, ProbeSigns(2, x), record=True,
        on_forward=on_forward, out_written={"b"}, recompute=recompute,
    )  # fmt: skip
    assert not grads.failed and grads.forward is not None
    return alive, grads.forward, values


def test_outputs_not_kept_are_let_go_before_the_backward_and_computed_again_the_same() -> None:
    alive, forward, values = _probe(frozenset({"a", "b"}))
    assert alive == {"a": False, "b": False, "same": True}
    for call in forward.calls:
        assert (call.out is None) == (call.name in {"a", "b"})
        assert torch.equal(call.output(), values[call.name]), call.name
    kept_alive, kept, _ = _probe(frozenset())
    assert kept_alive == {"a": True, "b": True, "same": True}  # the test can tell the two apart
    assert all(call.out is not None for call in kept.calls)
