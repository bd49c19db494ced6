"""`Method`: one remedy, described the same way for rules and decided states, fitted once from statistics."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sensitivity.errors import ConfigError
from sensitivity.methods.base import FP, NAIVE, Method
from sensitivity.policy import Rule
from sensitivity.quant.registry import quant_class_for
from sensitivity.quant.smoothing import smoothed_input_amax, smoothing_factors
from sensitivity.quant.state import LayerState
from sensitivity.spec import QuantSpec


def _layer() -> nn.Module:
    conv = nn.Conv2d(4, 3, 3)
    return quant_class_for(conv).from_float(copy.deepcopy(conv), QuantSpec())  # type: ignore[union-attr]


def _state(**kw: object) -> LayerState:
    base = {"method": "naive", "input_amax": torch.tensor(2.0), "input_unsigned": False,
            "weight_amax": torch.ones(3), "channel_absmax": torch.tensor([1.0, 8.0, 0.0, 2.0])}  # fmt: skip
    return LayerState(**{**base, **kw})  # type: ignore[arg-type]


def test_rules_and_states_name_the_same_method() -> None:
    sq = Rule("x", "smoothquant", alpha=0.5, granularity="channel")
    assert Method.of(sq) == Method.of(
        _state(method="smoothquant", alpha=0.5, granularity="channel", mode="static")
    )
    assert Method.of(sq).key == "sq_channel_0.5"
    assert Method.of(None) == NAIVE and Method.of(Rule("x", "fp")) == FP
    assert Method.of(sq).rule_fields() == {
        "method": "smoothquant",
        "alpha": 0.5,
        "granularity": "channel",
        "mode": "static",
    }


def test_fit_is_the_smoothquant_formula_from_the_kept_statistics() -> None:
    layer, stats = _layer(), _state()
    setting = Method("smoothquant", 0.5, "channel", "static").fit(layer, stats)
    s = smoothing_factors(stats.channel_absmax, layer.weight_input_absmax(), 0.5)
    assert torch.equal(setting.smooth_scale, s)
    assert torch.equal(setting.input_amax, smoothed_input_amax(stats.channel_absmax, s))
    naive = NAIVE.fit(layer, stats)
    assert naive.method == "naive" and torch.equal(naive.input_amax, torch.tensor(2.0))
    assert FP.fit(layer, stats).method == "fp"
    assert Method("smoothquant", 0.5, "channel", "dynamic").fit(layer, stats).dynamic_alpha == 0.5


def test_research_and_missing_statistics_are_refused() -> None:
    with pytest.raises(ConfigError, match="research-only"):
        Method("smoothquant", 0.5, "im2col", "static").fit(_layer(), _state())
    with pytest.raises(ConfigError, match="no per-channel statistics"):
        Method("smoothquant", 0.5, "channel", "static").fit(_layer(), _state(channel_absmax=None))
