"""The outputs-only check (kept FP outputs, one quantized forward) against the full FP + quantized pass: the
same model-output errors and the same first non-finite place, for a clean and an overflowing configuration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sensitivity.capture.calibrate import calibrate
from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.passes import compare_pass
from sensitivity.pipeline.exact import OutputReference
from sensitivity.prepare import Prepared, prepare
from sensitivity.quant.build import ActQuant, LayerQuant, build_quant_model, configure_layers
from sensitivity.spec import QuantSpec
from tests.test_scan import ExpHead


def naive_setup(
    model: nn.Module, batches: list[torch.Tensor]
) -> tuple[Prepared, nn.Module, dict[str, LayerQuant]]:
    """`model` prepared and calibrated on `batches` (W8A8), its quantized copy, every layer's naive setting."""
    prep = prepare(model, batches[0])
    spec = QuantSpec()
    observers = calibrate(prep.model, prep.layers, batches, spec)
    acts = {n: o.amax() for n, o in observers.items()}
    qmodel = build_quant_model(prep.model, {n: ActQuant(a, False) for n, a in acts.items()}, spec)
    return prep, qmodel, {layer.name: LayerQuant("naive", acts[layer.name]) for layer in prep.layers}


@pytest.mark.parametrize("config", ["all naive", "dim in FP", "stem in FP"])
def test_outputs_only_check_matches_the_full_pass(config: str) -> None:
    batches = [torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    prep, qmodel, configs = naive_setup(ExpHead().eval(), batches)
    if config != "all naive":
        configs[config.split()[0]] = LayerQuant("fp")
    select = OutputSelector(("dim", "feat"))
    ref = OutputReference.run(prep.model, prep.layers, batches, select, budget_mb=0.0)
    fast = ref.check(qmodel, prep.layers, configs)
    configure_layers(qmodel, configs)
    full = compare_pass(prep.model, qmodel, prep.layers, batches, outputs=select, energy=ref.energy)
    assert fast.first_nonfinite == full.first_nonfinite
    assert fast.nonfinite_upstream == full.nonfinite_upstream
    assert fast.out.keys() == full.out.keys()
    for key in full.out:  # same tensors, same order of sums: equal to the last bit
        assert fast.out[key].metrics() == pytest.approx(full.out[key].metrics(), rel=0, abs=0, nan_ok=True)
    a, b = fast.out_rel_mse(), full.out_rel_mse()
    assert (math.isnan(a) and math.isnan(b)) or a == b
    assert not fast.cum  # no per-layer errors: no FP forward ran
    if config == "all naive":
        assert full.first_nonfinite == "decode" and full.nonfinite_upstream == ["stem", "dim"]
    if config == "dim in FP":
        assert full.first_nonfinite is None
