"""pytorch-quantization interop, against the real pytorch-quantization 2.1.3 on CPU.

Its checkpoints scan with their own input amax; our final model, written in its `_amax` layout, loads into
its `QuantConv2d` / `QuantLinear` and computes the same outputs.

Tolerance. pytorch-quantization rounds x * (qmax / amax) and dequantizes code / (qmax / amax); we round
x / (amax / qmax) and dequantize code * (amax / qmax) (ONNX). So (1) integer codes may differ only where
x * qmax / amax lies within a few ulps of a .5 tie (`_near_tie`), by one step; (2) equal codes dequantize
to values a few ulps of amax apart. Per layer, fed the same input, the outputs then differ by at most
(input code flips) * step * max|W| + float noise; float noise is bounded by `_FLOAT_NOISE` * max|y|, about
1% of what a single code flip does to a layer's output here (step * typical |w|), so a real disagreement
fails (checked: scaling any written amax by 1.001 fails these tests).

Measured on these seeded inputs: no code flips among ~0.19 M quantized activations and weights per test
(1 to 5 of them within the tie window), end-to-end differences <= 2.6e-7 of max|y|; on values built to
sit on .5 ties, 20 of 254 codes differ (by one step).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sensitivity import ScanOptions, ScanResult, scan
from sensitivity.apply import apply_policy
from sensitivity.cli import main
from sensitivity.integrations.pytorch_quantization import (
    UnfoldedSmoothingError,
    save_amax_state_dict,
    sidecar_path,
    to_pytorch_quantization,
)
from sensitivity.io.pq_checkpoint import split_checkpoint_amax, usable_checkpoint_amax
from sensitivity.load import load_model
from sensitivity.quant.build import quant_layers
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.spec import QuantSpec
from tests.models import FoldableOutliers, OutlierChannelsNet

quant_nn = pytest.importorskip("pytorch_quantization.nn")
from pytorch_quantization.tensor_quant import QuantDescriptor  # noqa: E402

MODELS = str(Path(__file__).with_name("models.py"))
HERE = str(Path(__file__).resolve())
#: float noise allowed on outputs, relative to max|y| (measured: ~2e-7)
_FLOAT_NOISE = 1e-5


@pytest.fixture(autouse=True, scope="module")
def _quiet_absl() -> Iterator[None]:
    """pytorch-quantization logs every calibrator and amax load through absl: errors only here."""
    from absl import logging as absl_logging

    before = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    yield
    absl_logging.set_verbosity(before)


class SmallCNN(nn.Module):
    """Conv (stride 2, grouped) and Linear layers, no BN (so the scan folds nothing); `quant=True` builds
    it from pytorch-quantization's modules (per-tensor inputs, per-channel weights by default)."""

    def __init__(self, quant: bool = False) -> None:
        super().__init__()
        conv = quant_nn.QuantConv2d if quant else nn.Conv2d
        linear = quant_nn.QuantLinear if quant else nn.Linear
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv1 = conv(3, 16, 3, padding=1)
            self.conv2 = conv(16, 32, 3, padding=1, stride=2)
            self.conv3 = conv(32, 32, 3, padding=1, groups=4)
            self.fc = linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean(dim=(2, 3)))


def _batches(n: int, shape: tuple[int, ...], seed: int, gain: float = 1.0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [gain * torch.randn(*shape, generator=g) for _ in range(n)]


def _calibrate_pq(model: nn.Module, batches: list[Tensor]) -> None:
    """pytorch-quantization's own max calibration: collect, then `load_calib_amax()` (CPU-safe for max)."""
    quantizers = [m for m in model.modules() if isinstance(m, quant_nn.TensorQuantizer)]
    for q in quantizers:
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        for b in batches:
            model(b)
    for q in quantizers:
        q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


def _near_tie(x: Tensor, amax: Tensor, qmax: int) -> Tensor:
    """Where x * qmax / amax (exact, in float64) lies within a few float32 ulps of a .5 tie."""
    t = x.double() * qmax / amax.double()
    return (t - t.floor() - 0.5).abs() <= 8 * 2.0**-24 * t.abs().clamp_min(1.0)


def _compare_quantizer(ours: TensorQuantizer, theirs: nn.Module, x: Tensor, axis_shape: list[int]) -> int:
    """Code flips between the two quantizers on `x`; asserts each is at a tie and equal codes agree to
    float noise. Returns the number of flips."""
    amax = theirs._amax.detach()
    qmax = 2 ** (ours.num_bits - int(not ours.unsigned)) - 1
    step = (amax / qmax).reshape(axis_shape) if amax.numel() > 1 else amax / qmax
    amax_b = amax.reshape(axis_shape) if amax.numel() > 1 else amax
    with torch.no_grad():
        y_ours, y_theirs = ours(x), theirs(x)
    diff = (y_ours - y_theirs).abs()
    flips = diff > step / 2
    assert not (flips & ~_near_tie(x, amax_b, qmax)).any(), "codes differ away from a .5 tie"
    assert (diff[~flips] <= (2.0**-20 * amax_b).expand_as(diff)[~flips]).all(), "dequantized values differ"
    assert (diff[flips] <= (1.01 * step).expand_as(diff)[flips]).all(), "a flip larger than one step"
    return int(flips.sum())


def _compare_layerwise(ours: nn.Module, theirs: nn.Module, names: list[str], x: Tensor) -> dict[str, int]:
    """Each layer fed pytorch-quantization's own input for it: quantizers and outputs compared.

    Each input element meets each output element through one weight at most (and each weight meets it
    through one input), so |y_ours - y_theirs| <= flips_in * step_in * max|W| + flips_w * step_w * max|x|
    + float noise. Returns the flips per layer."""
    inputs: dict[str, Tensor] = {}
    hooks = [
        theirs.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
        for n in names
    ]
    try:
        with torch.no_grad():
            theirs(x)
    finally:
        for h in hooks:
            h.remove()
    layers = quant_layers(ours)
    flips = {}
    for n in names:
        mine, pq = layers[n], theirs.get_submodule(n)
        xin = inputs[n]
        w_shape = [-1] + [1] * (pq.weight.dim() - 1)
        f_in = _compare_quantizer(mine.input_quantizer, pq._input_quantizer, xin, [1])
        f_w = _compare_quantizer(mine.weight_quantizer, pq._weight_quantizer, mine.smoothed_weight(), w_shape)
        with torch.no_grad():
            y_ours, y_theirs = mine(xin), pq(xin)
        step_in = float(pq._input_quantizer._amax) / (255 if mine.input_quantizer.unsigned else 127)
        bound = f_in * step_in * float(pq.weight.detach().abs().max()) + _FLOAT_NOISE * float(
            y_theirs.abs().max()
        )
        bound += f_w * float(pq._weight_quantizer._amax.max()) / 127 * float(xin.abs().max())
        assert float((y_ours - y_theirs).abs().max()) <= bound, n
        flips[n] = f_in + f_w
    return flips


def _assert_outputs_match(ours: nn.Module, theirs: nn.Module, batches: list[Tensor]) -> None:
    """End to end: with no code flips on the way (checked layer-wise), only float noise may remain."""
    with torch.no_grad():
        for x in batches:
            y_ours, y_theirs = ours(x), theirs(x)
            tol = _FLOAT_NOISE * float(y_theirs.abs().max())
            torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------------ rounding
def test_codes_differ_only_at_ties() -> None:
    """The two rounding conventions on values built to sit on .5 ties, and on random values."""
    amax = torch.tensor(4.1841)
    theirs = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8))
    theirs.register_buffer("_amax", amax.clone())
    ours = TensorQuantizer(8)
    ours.set_amax(amax)
    codes = torch.arange(-127, 127, dtype=torch.float64) + 0.5
    ties = (codes * amax.double() / 127).float()
    rand = torch.randn(200_000, generator=torch.Generator().manual_seed(0)) * 1.5
    flips_ties = _compare_quantizer(ours, theirs, ties, [1])
    flips_rand = _compare_quantizer(ours, theirs, rand, [1])
    assert flips_ties > 0  # the convention does matter at ties (measured: 20 of 254)
    assert flips_rand <= int(_near_tie(rand, amax, 127).sum())


# --------------------------------------------------------------------------------------- reading its layout
def test_split_checkpoint_amax_strips_every_quantizer_key() -> None:
    pq = SmallCNN(quant=True).eval()
    _calibrate_pq(pq, _batches(2, (4, 3, 16, 16), seed=1))
    sd = pq.state_dict()
    sd["fc._input_quantizer.clip.clip_value_min"] = torch.tensor(-0.5)  # a learn_amax quantizer's range
    sd["fc._input_quantizer.clip.clip_value_max"] = torch.tensor(0.75)
    del sd["conv3._input_quantizer._amax"]  # an uncalibrated (dynamic) input quantizer
    plain, amax = split_checkpoint_amax(sd)
    assert plain.keys() == SmallCNN().state_dict().keys()
    assert sorted(amax) == ["conv1", "conv2", "conv3", "fc"]
    assert "input" not in amax["conv3"]
    assert amax["conv1"]["input"].shape == () and amax["conv1"]["input"].dtype == torch.float32
    assert torch.equal(amax["conv1"]["input"], pq.conv1._input_quantizer._amax)
    assert amax["conv2"]["weight"].shape == (32, 1, 1, 1) and amax["fc"]["weight"].shape == (10, 1)
    assert float(amax["fc"]["input"]) == 0.75

    usable, dropped = usable_checkpoint_amax(
        {
            "x": {"input": torch.tensor(float("nan")), "weight": torch.ones(2, 1)},
            "y": {"input": torch.ones(3)},
        }
    )
    assert list(usable) == ["x"] and list(usable["x"]) == ["weight"] and sorted(dropped) == ["x", "y"]


def test_scan_uses_the_checkpoint_amax_and_matches_pytorch_quantization(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pq = SmallCNN(quant=True).eval()
    _calibrate_pq(pq, _batches(4, (8, 3, 16, 16), seed=1))
    path = tmp_path / "pq.pth"
    torch.save(pq.state_dict(), path)

    with caplog.at_level("INFO", logger="sensitivity.load"):
        model = load_model(path, arch=f"{HERE}:SmallCNN")
    assert "checkpoint with input amax for 4 layers" in caplog.text
    assert not any(isinstance(m, quant_nn.TensorQuantizer) for m in model.modules())
    ckpt = model.sensitivity_checkpoint_amax
    assert sorted(ckpt) == ["conv1", "conv2", "conv3", "fc"]

    # scan on other data (wider): its own calibration would give other ranges, the checkpoint's win
    result = scan(model, _batches(4, (8, 3, 16, 16), seed=2, gain=2.0), ScanOptions(alphas=()))
    for n, entry in ckpt.items():
        assert torch.equal(result.quant_state.layers[n].input_amax, entry["input"]), n
        assert float(result.observers[n].amax()) != float(entry["input"]), n

    naive = result.quantized_model("naive")
    evals = _batches(3, (8, 3, 16, 16), seed=3, gain=1.3)
    flips = [_compare_layerwise(naive, pq, list(ckpt), x) for x in evals]
    assert sum(sum(f.values()) for f in flips) == 0  # measured: no tie flips on these inputs
    _assert_outputs_match(naive, pq, evals)


# -------------------------------------------------------------------------------------- writing its layout
@pytest.fixture(scope="module")
def foldable() -> tuple[nn.Module, ScanResult]:
    model = FoldableOutliers().eval()
    # the thresholds policy: SmoothQuant wherever the isolated error says so (the layout is under test)
    result = scan(
        model, _batches(4, (8, 3, 12, 12), seed=4), ScanOptions(exclude=("c",), policy="thresholds")
    )
    return model, result


def _hand_built_foldable() -> nn.Module:
    """FoldableOutliers as a pytorch-quantization user writes it: `a`, `b` quantized, `c` plain (FP)."""
    model = FoldableOutliers().eval()
    for name in ("a", "b"):
        conv = getattr(model, name)
        q = quant_nn.QuantConv2d(conv.in_channels, conv.out_channels, 3, padding=1)
        # pytorch-quantization 2.1.3 calls .cuda() when loading an _amax into a quantizer without one
        q._input_quantizer.register_buffer("_amax", torch.zeros(()))
        q._weight_quantizer.register_buffer("_amax", torch.zeros(conv.out_channels, 1, 1, 1))
        setattr(model, name, q)
    return model.eval()


def test_round_trip_with_folded_smoothquant_and_an_fp_layer(
    foldable: tuple[nn.Module, ScanResult], tmp_path: Path
) -> None:
    model, result = foldable
    assert result.policy.rule_for("b").method == "smoothquant" and result.policy.rule_for("c").method == "fp"
    qmodel = apply_policy(model, result.policy, result.quant_state)
    path = save_amax_state_dict(qmodel, tmp_path / "pq.pt")

    sd = torch.load(path, weights_only=True)
    assert not [k for k in sd if ".input_quantizer." in k or ".weight_quantizer." in k or ".smoother." in k]
    assert sd["a._input_quantizer._amax"].shape == () and sd["b._weight_quantizer._amax"].shape == (
        40,
        1,
        1,
        1,
    )
    assert not [k for k in sd if k.startswith("c._")]  # the FP layer has no quantizer state
    assert torch.equal(sd["b.weight"], qmodel.b.weight)  # s baked in: the weight as deployed
    assert not torch.equal(sd["a.weight"], model.a.weight)  # 1/s folded into the producer
    side = json.loads(sidecar_path(path).read_text())
    assert side["fp_layers"] == ["c"] and side["unsigned"] == [] and sorted(side["layers"]) == ["a", "b"]

    theirs = _hand_built_foldable()
    theirs.load_state_dict(sd, strict=True)
    evals = _batches(3, (8, 3, 12, 12), seed=5)
    flips = [_compare_layerwise(qmodel, theirs, ["a", "b"], x) for x in evals]
    assert sum(sum(f.values()) for f in flips) == 0
    _assert_outputs_match(qmodel, theirs, evals)
    _assert_outputs_match(qmodel, to_pytorch_quantization(FoldableOutliers(), path), evals)


def test_round_trip_unsigned_inputs_and_linear(tmp_path: Path) -> None:
    model = SmallCNN().eval()
    result = scan(
        model,
        _batches(4, (8, 3, 16, 16), seed=6),
        ScanOptions(spec=QuantSpec(act_sign="auto"), alphas=(), max_fp_layers=0),
    )
    qmodel = apply_policy(model, result.policy, result.quant_state)
    path = save_amax_state_dict(qmodel, tmp_path / "pq.pt")
    assert json.loads(sidecar_path(path).read_text())["unsigned"] == ["conv2", "conv3", "fc"]
    assert torch.load(path, weights_only=True)["fc._weight_quantizer._amax"].shape == (10, 1)

    theirs = to_pytorch_quantization(SmallCNN(), path)
    assert theirs.fc._input_quantizer.unsigned and not theirs.conv1._input_quantizer.unsigned
    evals = _batches(3, (8, 3, 16, 16), seed=7)
    flips = [_compare_layerwise(qmodel, theirs, ["conv1", "conv2", "conv3", "fc"], x) for x in evals]
    assert sum(sum(f.values()) for f in flips) == 0
    _assert_outputs_match(qmodel, theirs, evals)


class FoldedTransposed(nn.Module):
    """Conv-BN (the scan folds the BN), a ConvTranspose2d (weight [Cin, Cout, k, k]) and a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1)
            self.head = nn.Conv1d(6, 4, 3)
            self.bn.running_mean.uniform_(-1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.up(F.relu(self.bn(self.conv(x)))).flatten(2))


def test_round_trip_folded_bn_and_transposed_conv(tmp_path: Path) -> None:
    """The output channels of a transposed conv are weight axis 1: its amax is [1, Cout, 1, 1], and the
    sidecar says axis 1 (pytorch-quantization's default descriptor would use 0)."""
    model = FoldedTransposed().eval()
    result = scan(model, _batches(4, (4, 3, 8, 8), seed=10), ScanOptions(alphas=(), max_fp_layers=0))
    qmodel = apply_policy(model, result.policy, result.quant_state)
    path = save_amax_state_dict(qmodel, tmp_path / "pq.pt")
    sd = torch.load(path, weights_only=True)
    assert sd["up._weight_quantizer._amax"].shape == (1, 6, 1, 1)
    assert sd["head._weight_quantizer._amax"].shape == (4, 1, 1) and "bn.weight" not in sd
    side = json.loads(sidecar_path(path).read_text())
    assert side["folded_bn"] == {"conv": "bn"} and side["layers"]["up"]["weight"]["axis"] == 1
    _assert_outputs_match(
        qmodel, to_pytorch_quantization(FoldedTransposed(), path), _batches(3, (4, 3, 8, 8), seed=11)
    )


@pytest.fixture(scope="module")
def unfoldable() -> tuple[nn.Module, ScanResult]:
    model = OutlierChannelsNet().eval()
    return model, scan(model, _batches(4, (8, 3, 12, 12), seed=8), ScanOptions(policy="thresholds"))


def test_unfolded_smoothquant_is_refused(unfoldable: tuple[nn.Module, ScanResult], tmp_path: Path) -> None:
    model, result = unfoldable
    qmodel = apply_policy(model, result.policy, result.quant_state)
    with pytest.raises(UnfoldedSmoothingError) as info:
        save_amax_state_dict(qmodel, tmp_path / "pq.pt")
    msg = str(info.value)
    assert "\n" not in msg and "mid, fc1" in msg and "--format native" in msg
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_apply_writes_the_pytorch_quantization_layout(tmp_path: Path) -> None:
    model_path = tmp_path / "foldable.pth"
    torch.save(FoldableOutliers().state_dict(), model_path)
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(9)), calib)
    report, arch = tmp_path / "report", f"{MODELS}:FoldableOutliers"
    assert main(["scan", str(model_path), "--arch", arch, "--calib", str(calib), "--out", str(report),
                 "--quiet", "--policy-by", "thresholds"]) == 0  # fmt: skip
    argv = ["apply", str(model_path), "--arch", arch, "--policy", str(report / "policy.yaml"),
            "--format", "pytorch-quantization", "--onnx"]  # fmt: skip
    assert main(argv) == 0
    for name in ("model_quant.pt", "model_quant_pytorch_quantization.pt", "model_quant.onnx"):
        assert (report / name).is_file(), name
    written = report / "model_quant_pytorch_quantization.pt"
    assert json.loads(sidecar_path(written).read_text())["layers"]["b"]["smoothquant"]
    assert "b._input_quantizer._amax" in torch.load(written, weights_only=True)


def test_cli_apply_refuses_an_unfolded_smoother(
    unfoldable: tuple[nn.Module, ScanResult], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, result = unfoldable
    report = result.save(str(tmp_path / "report"))
    model_path = tmp_path / "outliers.pth"
    torch.save(model.state_dict(), model_path)
    argv = ["apply", str(model_path), "--arch", f"{MODELS}:OutlierChannelsNet",
            "--policy", str(report / "policy.yaml"), "--format", "pytorch-quantization"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mid, fc1" in err and "--format native" in err
    assert not (report / "model_quant_pytorch_quantization.pt").exists()
