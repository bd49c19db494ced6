"""`build_candidates`: which isolated candidates each layer gets, and that each runs the layer its way."""

from __future__ import annotations

import copy

import torch
from torch import nn

from sensitivity.capture.observe import LayerObserver
from sensitivity.methods.candidates import build_candidates
from sensitivity.quant.registry import quant_class_for
from sensitivity.spec import QuantSpec


def _setup(nonneg: bool):  # type: ignore[no-untyped-def]
    spec = QuantSpec()
    mods = {"conv": nn.Conv2d(4, 4, 3, padding=1), "fc": nn.Linear(4, 2)}
    q = {n: quant_class_for(m).from_float(copy.deepcopy(m), spec) for n, m in mods.items()}  # type: ignore[union-attr]
    obs = {"conv": LayerObserver(spec, 1), "fc": LayerObserver(spec, -1)}
    x = torch.randn(2, 4, 5, 5)
    x = x.relu() if nonneg else x
    obs["conv"].col_module = mods["conv"]
    obs["conv"].observe(x)
    obs["fc"].observe(x.mean(dim=(2, 3)))
    for n, layer in q.items():
        layer.input_quantizer.set_amax(obs[n].amax())
    return q, obs, spec, x


def test_each_layer_gets_naive_sign_and_smoothquant_candidates() -> None:
    q, obs, spec, _ = _setup(nonneg=True)
    cands, refused = build_candidates(q, obs, spec, (0.25, 0.5), ("channel", "im2col"), "static")
    assert list(cands["conv"]) == ["naive", "unsigned", "sq_channel_0.25", "sq_channel_0.5", "sq_im2col_0.25",
                                   "sq_im2col_0.5"]  # fmt: skip
    assert list(cands["fc"]) == ["naive", "unsigned", "sq_channel_0.25", "sq_channel_0.5"]
    assert set(refused) == {"fc"} and "im2col" in refused["fc"]


def test_signed_inputs_get_no_sign_candidate_and_no_smoothing_is_respected() -> None:
    q, obs, spec, _ = _setup(nonneg=False)
    cands, _ = build_candidates(q, obs, spec, (0.5,), ("channel",), "static", no_smoothing={"conv"})
    assert list(cands["conv"]) == ["naive"] and list(cands["fc"]) == ["naive", "sq_channel_0.5"]


def test_candidates_leave_the_layer_as_it_was() -> None:
    q, obs, spec, x = _setup(nonneg=True)
    conv = q["conv"]
    before = conv((x,)[0]).detach()
    cands, _ = build_candidates(q, obs, spec, (0.5,), ("channel",), "static")
    for fn in cands["conv"].values():
        fn((x,))
    assert torch.equal(conv(x), before) and conv.smoother is None and not conv.input_quantizer.unsigned
