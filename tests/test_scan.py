"""End-to-end scans on tiny models: planted faults found, outputs of every shape, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity import ScanOptions, scan
from sensitivity.errors import CalibrationDataError, FPModelError, NoQuantizableLayersError
from sensitivity.spec import QuantSpec
from tests.models import Decode, PlantedOutlierNet, TinyConvNet, plant_exp_fault_


def _batches(n: int = 4, shape: tuple[int, ...] = (4, 3, 12, 12), seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


def test_planted_outlier_layer_is_exactly_the_one_excluded() -> None:
    model = PlantedOutlierNet()
    before = _hash(model)
    result = scan(model, _batches())
    assert list(result.excluded) == ["mid"]
    row = result.table.loc["mid"]
    assert row["iso_naive_rel_l1"] > 0.5  # all ordinary channels quantize to zero
    assert result.table.drop("mid")["iso_naive_rel_l1"].max() < 0.05
    assert row["outlier_ratio"] > 1e3
    comp = result.comparison.set_index("config")
    # keeping `mid` in FP fixes the model's output error by well over an order of magnitude
    assert comp.loc["naive+exclusion", "out_rel_l1"] < comp.loc["naive", "out_rel_l1"] / 10
    assert _hash(model) == before
    # the policy's one FP slot goes to the same layer (where naive quantization costs the most)
    assert [n for n in result.table.index if result.policy.method_for(n) == "fp"] == ["mid"]
    # without FP slots the policy goes further: SmoothQuant moves the outlier into `mid`'s weight and
    # keeps it quantized
    assert row["iso_sq_rel_l1"] < row["iso_naive_rel_l1"] / 20
    repaired = scan(model, _batches(), ScanOptions(max_fp_layers=0))
    assert repaired.policy.method_for("mid") == "smoothquant"
    assert repaired.policy.method_for("post") != "fp"
    comp = repaired.comparison.set_index("config")
    assert comp.loc["policy", "out_rel_l1"] < comp.loc["naive", "out_rel_l1"] / 10


def test_without_smoothquant_the_policy_is_the_exclusion_list() -> None:
    result = scan(PlantedOutlierNet(), _batches(), ScanOptions(alphas=()))
    assert result.policy.method_for("mid") == "fp"
    assert "iso_sq_rel_l1" not in result.table.columns


def test_clean_model_keeps_every_layer_quantized() -> None:
    result = scan(TinyConvNet(), _batches())
    assert result.excluded == {}
    assert set(result.table["decision"]) == {"naive"}
    # policy v2 says why: the layers' predicted output errors add up to a negligible one
    assert result.table["out_naive_err"].sum() < 1e-4
    assert result.table["reason"].str.contains("negligible").all()
    assert "negligible" in result.policy.rules[-1].reason
    assert (result.table["iso_naive_sqnr_db"] > 25).all()
    assert list(result.table.index) == ["stem.0", "conv1", "dw", "pw", "fc"]
    assert result.calibration == {"batches": 4, "fit_batches": 3, "heldout_batches": 1}


def test_cumulative_equals_isolated_at_the_first_layer() -> None:
    # the first layer's quantized input is the FP input in both modes: the two errors must agree exactly
    t = scan(TinyConvNet(), _batches()).table
    assert t.loc["stem.0", "iso_naive_mse"] == t.loc["stem.0", "cum_naive_mse"]
    assert t.loc["conv1", "iso_naive_mse"] != t.loc["conv1", "cum_naive_mse"]


class ExpHead(nn.Module):
    """`dim`'s input: 7 channels at 1 and one at 1e5 (its weight compensates), so FP dim = bias - 6.
    Per-tensor quantization (amax 1e5) zeroes the ordinary channels and the tiny weight: dim = bias,
    and exp(gain * bias) overflows float32 while exp(gain * (bias - 6)) is finite."""

    def __init__(self, bias: float = 5.0, gain: float = 20.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dim = nn.Conv2d(8, 1, 1)
        self.decode = Decode(gain)
        self.register_buffer("gain", plant_exp_fault_(self.stem, self.dim, bias))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu(self.stem(x)) * self.gain
        return {"dim": self.decode(self.dim(h)), "feat": h}


def test_first_nonfinite_layer_is_named_and_its_cause_excluded() -> None:
    model = ExpHead()
    batches = [torch.rand(2, 3, 8, 8) for _ in range(4)]
    with torch.no_grad():
        assert all(torch.isfinite(model(b)["dim"]).all() for b in batches)
    result = scan(model, batches, ScanOptions(outputs=("dim",)))
    assert result.first_nonfinite == "decode"
    assert list(result.excluded) == ["dim"]
    comp = result.comparison.set_index("config")
    assert comp.loc["naive", "out_nonfinite"] == 2 * 8 * 8
    assert comp.loc["naive+exclusion", "out_nonfinite"] == 0
    assert result.policy_first_nonfinite is None


def test_nonfinite_repair_when_thresholds_miss_the_cause() -> None:
    # bias 89.5, gain 1: the isolated error (6 on 83.5, 7% / 23 dB) passes the thresholds,
    # yet exp(89.5) overflows: the scan must still find and exclude `dim` (measured exactly, outside the
    # FP budget), and a thresholds-only policy repairs it by the verifying pass.
    model = ExpHead(bias=89.5, gain=1.0)
    batches = [torch.rand(2, 3, 8, 8) for _ in range(4)]
    result = scan(model, batches, ScanOptions(outputs=("dim",)))
    assert result.first_nonfinite == "decode"
    assert list(result.excluded) == ["dim"]
    assert "turns the model's outputs non-finite" in result.excluded["dim"].reason
    assert result.policy_first_nonfinite is None
    v1 = scan(model, batches, ScanOptions(outputs=("dim",), policy="thresholds"))
    assert list(v1.excluded) == ["dim"]
    assert "turns non-finite at decode" in v1.excluded["dim"].reason


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.a(x) * scale
        return h, [self.b(h), torch.zeros(1, dtype=torch.long)]


def test_tuple_batches_and_nested_outputs() -> None:
    batches = [(torch.randn(5, 6), torch.tensor(2.0)) for _ in range(3)]
    result = scan(TupleOut(), batches)
    assert list(result.table.index) == ["a", "b"]
    assert result.table.loc["b", "in_shape"] == "5x4"
    assert result.table.loc["a", "macs"] == 6 * 4


def test_single_batch_scores_on_the_fitting_batch() -> None:
    result = scan(TinyConvNet(), _batches(1))
    assert result.calibration == {"batches": 1, "fit_batches": 1, "heldout_batches": 1}


def test_specs_and_calibrators_run() -> None:
    for spec in (QuantSpec.parse("W4A8"), QuantSpec.parse("W8A4"), QuantSpec(calibrator="entropy")):
        t = scan(TinyConvNet(), _batches(), ScanOptions(spec=spec)).table
        assert t["iso_naive_sqnr_db"].notna().all()
    w8 = scan(TinyConvNet(), _batches()).table["iso_naive_sqnr_db"]
    w4 = scan(TinyConvNet(), _batches(), ScanOptions(spec=QuantSpec.parse("W4A8"))).table["iso_naive_sqnr_db"]
    assert (w4 < w8).all()


def test_act_sign_auto_reports_the_signed_alternative() -> None:
    t = scan(TinyConvNet(), _batches(), ScanOptions(spec=QuantSpec(act_sign="auto"))).table
    nonneg = t["input_min"] >= 0
    assert nonneg.sum() >= 3  # after ReLU
    assert t.loc[nonneg, "act_unsigned"].all()
    assert t.loc[nonneg, "unsigned_gain_db"].gt(0).all()  # a spare bit of resolution helps
    assert t.loc[~nonneg, "unsigned_gain_db"].isna().all()


def test_user_exclusion_globs_are_honoured() -> None:
    result = scan(TinyConvNet(), _batches(), ScanOptions(exclude=("d*", "fc")))
    assert list(result.excluded) == ["dw", "fc"]
    assert result.excluded["fc"].reason == "listed in the user's exclusion file"


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(CalibrationDataError, match="empty"):
        scan(TinyConvNet(), [])
    with pytest.raises(
        CalibrationDataError, match=r"rejected calibration batch 0 \(tensor float32\[2, 5, 8, 8\]\)"
    ):
        scan(TinyConvNet(), [torch.randn(2, 5, 8, 8)])
    with pytest.raises(NoQuantizableLayersError):
        scan(nn.Sequential(nn.ReLU()), _batches(1))
    with pytest.raises(NoQuantizableLayersError, match="--only"):
        scan(TinyConvNet(), _batches(1), ScanOptions(only=("nothing.*",)))

    class NaNModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) / 0.0 * 0.0

    with pytest.raises(FPModelError, match="FP model itself"):
        scan(NaNModel(), [torch.randn(2, 4)])


def test_saved_report_is_deterministic(tmp_path: Path) -> None:
    files = ("layers.csv", "exclude.yaml", "policy.yaml")
    digests = []
    for i in range(2):
        torch.manual_seed(0)
        out = scan(PlantedOutlierNet(), _batches(), ScanOptions(seed=7)).save(str(tmp_path / f"r{i}"))
        digests.append([(out / f).read_bytes() for f in files])
        assert sorted(p.name for p in out.iterdir()) == sorted(
            [
                *files,
                ".sensitivity",
                "scan.json",
                "quant_state.pt",
                "stats.npz",
                "model_quant.pt",
                "report.html",
                "plots",
            ]
        )
    assert digests[0] == digests[1]
    state = torch.load(tmp_path / "r0" / "quant_state.pt", weights_only=True)
    assert set(state["layers"]) == {"stem", "mid", "post", "head"}
    assert state["layers"]["mid"]["input_amax"] > 1e3
