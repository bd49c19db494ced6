"""`QuantState`: the one object every consumer reads, its file form, and what a damaged file says."""

from __future__ import annotations

import pytest
import torch

from sensitivity.errors import ModelLoadError
from sensitivity.quant.state import LayerState, QuantState
from sensitivity.spec import QuantSpec


def _state() -> QuantState:
    naive = LayerState("naive", torch.tensor(1.0), False, torch.ones(2), torch.ones(3))
    sq = LayerState("smoothquant", torch.tensor(2.0), True, torch.ones(2), torch.ones(3), 0.5, "channel", "static",
                    torch.full((3,), 2.0), torch.tensor(0.5))  # fmt: skip
    return QuantState(QuantSpec(), {"a": naive, "b": sq}, {"a": "bn"}, {"b": "a"}, torch.zeros(1, 3))


def test_round_trip_through_the_file_form() -> None:
    state = _state()
    again = QuantState.from_dict(state.to_dict())
    assert (
        again.spec == state.spec
        and dict(again.folded_bn) == {"a": "bn"}
        and dict(again.sq_fold) == {"b": "a"}
    )
    assert torch.equal(again.layers["b"].smooth_scale, state.layers["b"].smooth_scale)
    assert again.layers["b"].calibrator is None and QuantState.from_dict(state) is state


def test_settings_per_configuration() -> None:
    state = _state()
    policy = state.configs("policy")
    assert policy["b"].method == "smoothquant" and torch.equal(policy["b"].input_amax, torch.tensor(0.5))
    assert state.configs("naive")["b"].method == "naive" and state.configs("naive")["b"].input_unsigned
    assert state.configs("exclusion", ["a"])["a"].method == "fp"
    assert (
        state.with_fp(["b"]).configs("policy")["b"].method == "fp"
        and state.layers["b"].method == "smoothquant"
    )


def test_version_1_files_read_with_the_specs_calibrator() -> None:
    data = _state().to_dict()
    data["version"] = 1
    for entry in data["layers"].values():
        del entry["calibrator"]
    assert QuantState.from_dict(data).layers["a"].calibrator == "max"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [(lambda d: d["layers"]["a"].update(method="magic"), "method 'magic'"),
     (lambda d: d["layers"]["a"].update(input_amax=torch.ones(2)), "not one finite number"),
     (lambda d: d["layers"]["b"].update(smooth_scale=None, channel_absmax=None), "without factors"),
     (lambda d: d.update(sq_fold={"b": 3}), "'sq_fold' is not a mapping")],
)  # fmt: skip
def test_damage_is_named(change, fragment: str) -> None:  # type: ignore[no-untyped-def]
    data = _state().to_dict()
    change(data)
    with pytest.raises(ModelLoadError, match=fragment):
        QuantState.from_dict(data, "q.pt")
