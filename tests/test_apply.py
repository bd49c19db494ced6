"""The final model: apply_policy, save/reload, ONNX Q/DQ export checked in ONNX Runtime, evaluation."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from torch import nn

from sensitivity import ScanOptions, scan
from sensitivity.apply import apply_policy, load_quantized, save_quantized
from sensitivity.cli import main
from sensitivity.errors import ConfigError, SpecError
from sensitivity.export import PARITY_RTOL, ExportError, export_onnx, tensorrt_warnings, verify_onnx
from sensitivity.policy import Policy, Rule, Thresholds
from sensitivity.spec import QuantSpec
from tests.models import FoldableOutliers, OutlierChannelsNet, TinyConvNet

MODELS = str(Path(__file__).with_name("models.py"))


def _batches(n: int = 4, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


def _hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode() + v.numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("cls", [FoldableOutliers, OutlierChannelsNet, TinyConvNet])
def test_save_reload_gives_identical_outputs(cls: type[nn.Module], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    before = _hash(model)
    result = scan(model, _batches(), ScanOptions(exclude=("c", "fc2", "fc")))
    qmodel = apply_policy(model, result.policy, result.quant_state)
    assert _hash(model) == before  # the user's model is never mutated
    path = save_quantized(qmodel, tmp_path / "model_quant.pt")
    torch.manual_seed(123)  # the factory's random init must not matter
    again = load_quantized(path, lambda: cls().eval())
    x = torch.randn(5, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(again(x), qmodel(x), rtol=0, atol=0)
        # and the applied model is, bit for bit, the model the scan measured as "policy" (with the
        # SmoothQuant division left on the consumer's input; folding it into the producer moves float
        # rounding, checked in the next test)
        unfolded = apply_policy(model, result.policy, result.quant_state, fold_smoothing=False)
        torch.testing.assert_close(unfolded(x), result.quantized_model("policy")(x), rtol=0, atol=0)


def test_smoothquant_division_folds_into_the_producer() -> None:
    model = FoldableOutliers()
    # no FP slot (the default's one would go to `b`, the layer naive quantization hurts most)
    result = scan(model, _batches(), ScanOptions(max_fp_layers=0))
    assert result.table.loc["b", "decision"] == "smoothquant"
    assert result.table.loc["b", "sq_fold"] == "a"
    q = apply_policy(model, result.policy, result.quant_state)
    assert q.b.smoother.folded and q.b.smoother.weight_baked
    unfolded = apply_policy(model, result.policy, result.quant_state, fold_smoothing=False)
    assert not unfolded.b.smoother.folded
    x = _batches(1, seed=5)[0]
    with torch.no_grad():
        # the division moved from b's input into a's output channels (per-channel weight codes are
        # scale-invariant): same outputs up to float rounding
        torch.testing.assert_close(q(x), unfolded(x), rtol=1e-5, atol=1e-6)


def test_policy_edits_are_honoured() -> None:
    model = OutlierChannelsNet()
    # policy v1 decides `mid` by its isolated errors: SmoothQuant, whatever the probes' random signs
    result = scan(model, _batches(), ScanOptions(policy="thresholds"))
    assert result.policy.rule_for("mid").method == "smoothquant"
    state = result.quant_state
    edited = Policy(rules=(Rule("mid", "smoothquant", alpha=0.9, granularity="channel"), Rule("**", "naive")))
    q = apply_policy(model, edited, state)
    chosen = state.layers["mid"].smooth_scale
    assert not torch.allclose(q.mid.smoother.scale, chosen)
    with pytest.raises(ConfigError, match="research-only"):
        apply_policy(
            model, Policy(rules=(Rule("mid", "smoothquant", alpha=0.5, granularity="im2col"),)), state
        )
    q_fp = apply_policy(model, Policy(rules=(Rule("**", "fp"),)), state)
    x = _batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(q_fp(x), result.fp_model(x), rtol=0, atol=0)


def test_onnx_export_matches_in_onnx_runtime(tmp_path: Path) -> None:
    # naive, SmoothQuant (folded into `a` and unfolded) and FP layers in one model
    model = OutlierChannelsNet()
    result = scan(model, _batches(), ScanOptions(exclude=("fc2",), policy="thresholds"))
    decisions = set(result.table["decision"])
    assert decisions == {"naive", "smoothquant", "fp"}
    q = apply_policy(model, result.policy, result.quant_state)
    path = export_onnx(q, _batches(1)[0][:1], tmp_path / "m.onnx", opset=13)
    graph = onnx.load(str(path)).graph
    names = [n.name for n in graph.node]
    assert "/mid/smoother/Mul" in names and "/mid/Conv" in names and "/fc2/Gemm" in names
    assert not any(n.startswith("/fc2/") and "Quantize" in n for n in names)  # FP layer: no Q/DQ
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 8  # input + weight for the 4 quantized layers
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    inputs = [_batches(1, seed=9)[0], _batches(1, seed=10)[0][:3]]  # dynamic batch: 8 and 3
    check = verify_onnx(path, q, inputs)
    # ORT computes Q/DQ with x / scale like the torch model: only conv/GEMM summation order differs
    assert check["max_abs_diff_qdq_reference"] <= 1e-5
    # ORT's optimised graph rounds intermediate sums differently: a measurable, bounded gap...
    assert 0 < check["max_abs_diff_int8_kernels"] < 0.05 * check["output_absmax"]
    # ...but not from int8 kernels: ORT's CPU QDQ fusion wants DQ -> Conv -> Q, and TensorRT-style
    # placement (Q/DQ on layer inputs only) has no Q after a layer, so ORT fuses Conv+Relu in float
    assert check["int8_kernel_nodes"] == 0
    assert check["verdict"] == "ok" and "float rounding" in check["verdict_reason"]
    assert "local_check" not in check  # outputs agree: no layer-by-layer check needed
    # forced, the layer-by-layer check finds every layer and agrees too
    local = verify_onnx(path, q, inputs[:1], local_check=True)["local_check"]
    assert local["layers_located"] == local["layers"] == 5
    assert local["first_difference"] is None and local["first_flipped_code"] is None
    assert max(local["worst_layer_rel_diff"], local["output_rel_diff"]) <= PARITY_RTOL


def _scale_input_quantizer(path: Path, layer: str, factor: float) -> None:
    """Plant a real mismatch: multiply the scale of `layer`'s input QuantizeLinear/DequantizeLinear."""
    model = onnx.load(str(path))
    q = next(n for n in model.graph.node if n.name == f"/{layer}/input_quantizer/QuantizeLinear")
    const = next(n for n in model.graph.node if n.output[0] == q.input[1])
    value = onnx.numpy_helper.to_array(const.attribute[0].t) * np.float32(factor)
    const.attribute[0].t.CopyFrom(onnx.numpy_helper.from_array(value.astype(np.float32)))
    onnx.save(model, str(path))


def test_onnx_mismatch_is_found_layer_by_layer(tmp_path: Path) -> None:
    model = OutlierChannelsNet()
    result = scan(model, _batches(), ScanOptions(alphas=()))
    q = apply_policy(model, result.policy, result.quant_state)
    path = export_onnx(q, _batches(1)[0][:1], tmp_path / "m.onnx")
    _scale_input_quantizer(path, "post", 1.05)
    check = verify_onnx(path, q, [_batches(1, seed=9)[0]])
    assert check["output_rel_diff_qdq_reference"] > PARITY_RTOL
    assert check["verdict"] == "mismatch"
    assert check["verdict_reason"].startswith("layer post computes otherwise given ORT's input")
    local = check["local_check"]
    assert local["first_difference"]["layer"] == "post"
    # everything upstream of the planted scale still agrees
    assert local["first_flipped_code"] is None or local["first_flipped_code"]["layer"] != "stem"


def test_export_refusals_and_tensorrt_warnings(tmp_path: Path) -> None:
    model = TinyConvNet()
    w4 = scan(model, _batches(), ScanOptions(spec=QuantSpec.parse("W4A8"), alphas=()))
    with pytest.raises(ExportError, match="8-bit quantizers only"):
        export_onnx(apply_policy(model, w4.policy, w4.quant_state), _batches(1)[0][:1], tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()
    auto = scan(model, _batches(), ScanOptions(spec=QuantSpec(act_sign="auto"), alphas=()))
    warnings = tensorrt_warnings(apply_policy(model, auto.policy, auto.quant_state))
    assert warnings and "--act-sign signed" in warnings[0]


def test_cli_apply_with_onnx_and_recalibration(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    model = tmp_path / "m.pth"
    torch.save(FoldableOutliers().state_dict(), model)
    calib = tmp_path / "calib.pt"
    torch.save(torch.cat(_batches()), calib)
    arch = f"{MODELS}:FoldableOutliers"
    report = tmp_path / "r"
    assert main(["scan", str(model), "--arch", arch, "--calib", str(calib), "--out", str(report), "-q"]) == 0
    assert (report / "model_quant.pt").exists()
    assert main(["apply", str(model), "--arch", arch, "--policy", str(report / "policy.yaml"), "--onnx"]) == 0
    check = json.loads((report / "export.json").read_text())
    assert check["max_abs_diff_qdq_reference"] <= 1e-5
    assert check["verdict"] == "ok"
    printed = capsys.readouterr().out
    assert "ONNX Runtime vs torch" in printed and "parity ok" in printed
    again = tmp_path / "again"
    args = [
        "apply",
        str(model),
        "--arch",
        arch,
        "--policy",
        str(report / "policy.yaml"),
        "--calib",
        str(calib),
    ]
    assert main([*args, "--out", str(again)]) == 0
    assert (again / "model_quant.pt").exists()
    (report / "quant_state.pt").unlink()
    assert main(["apply", str(model), "--arch", arch, "--policy", str(report / "policy.yaml")]) == 2
    assert "no quant state" in capsys.readouterr().err


def _top1_factory(batches: list[torch.Tensor]):
    def evaluate(model: nn.Module) -> dict[str, float]:
        # agreement with the FP model's argmax: a real accuracy-style metric on fixed inputs
        ref = OutlierChannelsNet()
        with torch.no_grad():
            hits = sum(int((model(b).argmax(1) == ref(b).argmax(1)).sum()) for b in batches)
        return {"top1": hits / sum(len(b) for b in batches), "neg_one": -1.0}

    return evaluate


def test_eval_and_exclusion_budget() -> None:
    evaluate = _top1_factory(_batches(3, seed=42))
    spec = QuantSpec.parse("W8A4")  # bad enough that the metric drops
    # thresholds off: the policy quantizes everything, so only the budget can restore the metric
    opts = ScanOptions(spec=spec, alphas=(), thresholds=Thresholds(None, None, True), policy="thresholds")
    result = scan(OutlierChannelsNet(), _batches(), opts, evaluate=evaluate)
    comp = result.comparison.set_index("config")
    assert comp.loc["fp", "eval_top1"] == 1.0
    assert comp.loc["naive", "eval_top1"] < 0.9
    assert comp.loc["policy", "eval_top1"] == comp.loc["naive", "eval_top1"]
    budget = scan(OutlierChannelsNet(), _batches(), replace(opts, exclude_budget=0.02), evaluate=evaluate)
    bcomp = budget.comparison.set_index("config")
    assert bcomp.loc["policy", "eval_top1"] >= 1.0 - 0.02
    steps = budget.table["budget_step"].dropna()
    assert len(steps) >= 1 and list(steps) == list(range(1, len(steps) + 1))
    assert all("exclusion budget" in budget.table.loc[n, "reason"] for n in steps.index)
    # policy v2 without FP slots and without SmoothQuant: the budget's steps follow the output-referred
    # ranking, so its first step is the layer predicted worst at the outputs and it needs no more steps
    v2 = replace(opts, policy="output", max_fp_layers=0, calibrator_choices=False, exclude_budget=0.02)
    out = scan(OutlierChannelsNet(), _batches(), v2, evaluate=evaluate)
    v2_steps = out.table["budget_step"].dropna().sort_values()
    assert out.comparison.set_index("config").loc["policy", "eval_top1"] >= 1.0 - 0.02
    assert v2_steps.index[0] == out.table["out_naive_err"].idxmax()
    assert len(v2_steps) <= len(steps)
    with pytest.raises(SpecError, match="not among the metrics"):
        scan(
            OutlierChannelsNet(),
            _batches(),
            ScanOptions(exclude_budget=0.1, eval_metric="mAP"),
            evaluate=evaluate,
        )
