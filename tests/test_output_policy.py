"""Policy v2 end to end: decisions by each layer's effect at the model's outputs, under the FP budget.

Planted models whose right answer is known: a locally terrible layer that the outputs never see, a layer
no gradient reaches, a layer whose inputs have rare spikes (a percentile range wins), a NaN fault that the
safety net must catch whatever the budget.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity import ScanOptions, apply_policy, scan
from sensitivity.errors import ConfigError
from sensitivity.policy import Policy, Rule
from sensitivity.quant.build import quant_layers
from tests.models import Decode, FoldableOutliers, plant_exp_fault_


class LoudBranch(nn.Module):
    """`loud` is the locally worst layer (an outlier input channel: per-tensor codes crush the others, rel
    L1 ~1) but its output enters the residual sum times 1e-3; `mild` quantizes like an ordinary layer
    locally (each weight row has one large tap: coarse per-channel codes, rel L1 ~0.04) and its output goes
    straight to the head. At the outputs `mild` dominates and `loud` is invisible."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.loud = nn.Conv2d(width, width, 3, padding=1)
        self.mild = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Conv2d(width, 4, 1)
        gain = torch.ones(1, width, 1, 1)
        gain[0, 5] = 300.0
        self.register_buffer("gain", gain)
        with torch.no_grad():
            self.loud.weight[:, 5] /= 300.0
            w = self.mild.weight.view(width, -1)
            w[torch.arange(width), torch.randint(0, w.shape[1], (width,))] = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        return self.head(F.relu(self.mild(h)) + 1e-3 * self.loud(h * self.gain))


def _batches(n: int = 4, shape: tuple[int, ...] = (8, 3, 16, 16), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _fp(result) -> set[str]:  # type: ignore[no-untyped-def]
    return {n for n, d in result.table["decision"].items() if d == "fp"}


def test_the_locally_worst_layer_harmless_at_the_outputs_stays_quantized() -> None:
    result = scan(LoudBranch(), _batches())
    t = result.table
    assert t.loc["loud", "iso_naive_rel_l1"] > 10 * t.loc["mild", "iso_naive_rel_l1"]  # locally worst
    assert t.loc["mild", "out_naive_err"] > 100 * t.loc["loud", "out_naive_err"]  # worst at the outputs
    assert _fp(result) == {"mild"} and list(result.excluded) == ["mild"]
    assert "output error" in result.excluded["mild"].reason
    assert "out_naive_err" in result.excluded["mild"].metrics
    comp = result.comparison.set_index("config")
    assert comp.loc["policy", "out_rel_mse"] < 0.5 * comp.loc["naive", "out_rel_mse"]
    # the thresholds of policy v1 exclude the wrong layer and gain nothing at the outputs
    v1 = scan(LoudBranch(), _batches(), ScanOptions(policy="thresholds"))
    assert list(v1.excluded) == ["loud"]
    v1_comp = v1.comparison.set_index("config")
    assert comp.loc["naive+exclusion", "out_rel_mse"] < 0.5 * v1_comp.loc["naive+exclusion", "out_rel_mse"]


class Blocked(nn.Module):
    """`a` reaches the output only through `.detach()`, `b` only through `round` (zero gradient), `c`
    through a `no_grad` block; `d` and `e` normally."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(16, 16) for _ in range(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x).detach()
        b = torch.round(self.b(x) * 8) / 8
        with torch.no_grad():
            c = self.c(x)
        return self.e(F.relu(self.d(x)) + a + b + c)


def test_layers_no_gradient_reaches_are_measured_exactly_never_scored_zero() -> None:
    result = scan(Blocked(), _batches(shape=(32, 16)))
    t = result.table
    for layer in ("a", "b", "c"):
        assert t.loc[layer, "out_err_source"].startswith("exact"), layer
        assert t.loc[layer, "out_naive_err"] > 0, layer
    for layer in ("d", "e"):
        assert t.loc[layer, "out_err_source"].startswith("probe"), layer
    # an exact value is the layer quantized alone, measured: check one against a manual run
    q = result.quantized_model("naive")
    from sensitivity.quant.build import LayerQuant, configure_layers

    configs = {n: LayerQuant("fp") for n in t.index}
    configs["a"] = result.quant_state.layers["a"].naive()
    configure_layers(q, configs)
    assert t.loc["a", "out_naive_err"] > 0


class ExpTail(nn.Module):
    """A NaN fault (`dim` overflows exp when quantized) in a model with 10 other layers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dim = nn.Conv2d(8, 1, 1)
        self.decode = Decode(20.0)
        self.body = nn.Sequential(*(nn.Conv2d(8, 8, 3, padding=1) for _ in range(10)))
        self.register_buffer("gain", plant_exp_fault_(self.stem, self.dim, 5.0))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.stem(x)) * self.gain
        return {"dim": self.decode(self.dim(h)), "feat": self.body(F.relu(self.stem(x)))}


@pytest.mark.parametrize("budget", [0, 1, 3])
def test_the_fp_budget_counts_layers_and_the_safety_net_is_free(budget: int) -> None:
    batches = [torch.rand(4, 3, 8, 8) for _ in range(4)]
    result = scan(ExpTail(), batches, ScanOptions(max_fp_layers=budget))
    # naive `dim` turns the model non-finite: the exclusion list keeps it in FP whatever the budget (the
    # repair loop), the policy either keeps it in FP or repairs it with SmoothQuant
    assert "dim" in result.excluded
    assert len(set(result.excluded) - {"dim"}) <= budget
    assert result.table.loc["dim", "decision"] in ("fp", "smoothquant")
    assert len(_fp(result) - {"dim"}) <= budget
    assert result.policy_first_nonfinite is None
    comp = result.comparison.set_index("config")
    assert comp.loc["naive", "out_nonfinite"] > 0
    assert comp.loc["policy", "out_nonfinite"] == 0 and comp.loc["naive+exclusion", "out_nonfinite"] == 0


def test_a_mac_budget_is_a_knapsack() -> None:
    result = scan(LoudBranch(), _batches(), ScanOptions(max_fp_layers=4, max_fp_macs=0.0))
    assert _fp(result) == set()
    macs = result.table["macs"]
    share = float(macs["mild"] / macs.sum())
    result = scan(LoudBranch(), _batches(), ScanOptions(max_fp_layers=4, max_fp_macs=share * 1.01))
    fp = _fp(result)
    assert "mild" in fp and float(macs[list(fp)].sum() / macs.sum()) <= share * 1.01 + 1e-3


class Spiky(nn.Module):
    """`spiky`'s input is ordinary except at rare positions (a fixed random mix of the input above 4: about
    1 in 16,000 values, in any channel) of 200: a max range spends the codes on them, a percentile clips
    them, and clipping costs nothing at the outputs (tanh saturates there either way)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(32, 64)
        self.spiky = nn.Linear(64, 64)
        self.head = nn.Linear(64, 8)
        self.register_buffer("mix", torch.randn(32, 64) / 32**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x)) + (x @ self.mix > 4.0).float() * 200.0
        return self.head(torch.tanh(self.spiky(h)))


def test_a_percentile_range_is_chosen_and_every_export_honours_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    batches = _batches(8, (64, 32))
    model = Spiky()
    # ranges only (pytorch-quantization below), no FP slot: the range is what is under test
    result = scan(model, batches, ScanOptions(alphas=(), max_fp_layers=0))
    rule = result.policy.rule_for("spiky")
    assert rule is not None and rule.method == "naive" and rule.calibrator is not None
    assert rule.calibrator.startswith("p")
    chosen_err = result.table.loc["spiky", f"out_naive_{rule.calibrator}_err"]
    assert chosen_err < 1e-3 * result.table.loc["spiky", "out_naive_err"]
    state = result.quant_state.layers["spiky"]
    chosen = state.range_amax[rule.calibrator]
    assert float(chosen) < 0.5 * float(state.input_amax)  # the range left the spikes out
    qmodel = apply_policy(model, result.policy, result.quant_state)
    assert torch.equal(quant_layers(qmodel)["spiky"].input_quantizer.amax, chosen)
    # the scan's own policy model uses the same range
    assert torch.equal(quant_layers(result.quantized_model("policy"))["spiky"].input_quantizer.amax, chosen)
    # an edited policy picks another range without recalibrating
    edited = Policy((Rule("head", "naive", calibrator="mse"), *result.policy.rules), spec=result.policy.spec)
    q2 = apply_policy(model, edited, result.quant_state)
    head = result.quant_state.layers["head"]
    assert torch.equal(quant_layers(q2)["head"].input_quantizer.amax, head.range_amax["mse"])
    # ONNX: the Q/DQ scale of spiky's input is the chosen amax / 127, and ONNX Runtime agrees
    from sensitivity.export import export_and_verify

    check = export_and_verify(qmodel, result.quant_state.example_input, tmp_path, 17)
    assert check["verdict"] == "ok", check["verdict_reason"]
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(tmp_path / "model_quant.onnx")).graph
    consts = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node if n.op_type == "Constant"
    }
    consts.update({i.name: numpy_helper.to_array(i) for i in graph.initializer})
    q_in = next(
        n for n in graph.node if n.op_type == "QuantizeLinear" and "/spiky/input_quantizer" in n.input[1]
    )
    assert math.isclose(float(consts[q_in.input[1]]), float(chosen) / 127, rel_tol=1e-6)
    # pytorch-quantization's layout carries the same amax
    from sensitivity.integrations.pytorch_quantization import save_amax_state_dict

    save_amax_state_dict(qmodel, tmp_path / "pq.pt")
    pq = torch.load(tmp_path / "pq.pt", weights_only=True)
    found = [
        v for k, v in pq.items() if k.startswith("spiky") and "input_quantizer" in k and k.endswith("_amax")
    ]
    assert found and torch.equal(found[0].reshape(()), chosen.reshape(()))


def test_probes_off_falls_back_to_the_thresholds_policy() -> None:
    result = scan(LoudBranch(), _batches(), ScanOptions(probes=0))
    assert "out_naive_err" not in result.table.columns
    assert list(result.excluded) == ["loud"] and result.fp_curve == []


@pytest.mark.parametrize("model", [LoudBranch, FoldableOutliers], ids=["naive-only", "with-smoothquant"])
def test_the_curve_is_predicted_at_every_step_and_measured_by_the_scans_own_passes(
    model: type[nn.Module],
) -> None:
    """All naive, then the FP layers added: measured at 0 by the scan's quantized pass and at the end by the
    exclusion's check; the policy (its methods on the other layers) as a last point where it differs. The
    curve runs no pass of its own: its measurements are the comparison's, bit for bit."""
    result = scan(model(), _batches(), ScanOptions(max_fp_layers=2))
    curve, comp = result.fp_curve, result.comparison.set_index("config")
    steps = [p for p in curve if not p.policy]
    assert len(steps) >= 2 and {p.layer for p in steps[1:]} == set(result.excluded)
    assert all(a.predicted >= b.predicted for a, b in itertools.pairwise(curve))
    assert steps[0].measured == comp.loc["naive", "out_rel_mse"]
    assert steps[-1].measured == comp.loc["naive+exclusion", "out_rel_mse"]
    assert curve[-1].measured == comp.loc["policy", "out_rel_mse"]
    assert curve[-1].policy == (
        comp.loc["policy", "out_rel_mse"] != comp.loc["naive+exclusion", "out_rel_mse"]
    )
    assert all(math.isnan(p.measured) for p in steps[1:-1])


def test_a_range_the_scan_did_not_keep_is_a_clear_error() -> None:
    """A policy edited to a calibrator the quant state holds no range for (a scan without calibrator
    choices): apply names the layer and the way out, and nothing is built."""
    model = Spiky()
    result = scan(model, _batches(4, (64, 32)), ScanOptions(alphas=(), calibrator_choices=False))
    assert not result.quant_state.layers["spiky"].range_amax
    for choice in ("p99.9", "mse", "max"):
        edited = Policy(
            (Rule("spiky", "naive", calibrator=choice), *result.policy.rules), spec=result.policy.spec
        )
        if choice == result.quant_state.layers["spiky"].calibrator_default:
            continue
        with pytest.raises(
            ConfigError, match=rf"^layer spiky: the quant state holds no '{choice}' activation range"
        ):
            apply_policy(model, edited, result.quant_state)


def test_plain_naive_instead_of_the_candidates_is_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The policy with plain naive for its SmoothQuant layers is the exclusion (the same FP set): the check
    of the candidates reuses the exclusion's pass instead of measuring it again."""
    from sensitivity.pipeline.exact import OutputReference

    measured: list[int] = []
    real = OutputReference.measure
    monkeypatch.setattr(OutputReference, "measure", lambda self, q, c: measured.append(1) or real(self, q, c))
    result = scan(FoldableOutliers(), _batches(), ScanOptions(max_fp_layers=0))  # no FP slot, no exact check
    assert result.policy.method_for("b") == "smoothquant"
    assert measured == []  # the plain-naive comparison came from the exclusion's check
    comp = result.comparison.set_index("config")
    assert comp.loc["policy", "out_rel_mse"] < comp.loc["naive+exclusion", "out_rel_mse"]
