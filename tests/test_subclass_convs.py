"""Conv / Linear subclasses are scanned, quantized where their forward calls the op, and what cannot be
scanned is said: in the ScanResult, on the console and in the report (issue: EfficientNet scanned 1 of 50)."""

from __future__ import annotations

import copy
import json
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sensitivity import scan
from sensitivity.capture.hooks import layer_inputs
from sensitivity.cli import main
from sensitivity.quant.fake import amax_to_scale, fake_quant
from sensitivity.quant.modules import QuantMixin, QuantWrapped
from sensitivity.quant.registry import quant_class_for
from sensitivity.quant.wrapped import OpIntercept, during_forward, overrides_forward
from sensitivity.spec import QuantSpec
from tests import subclass_models as sm

ROOT = Path(__file__).resolve().parents[1]


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(4, 3, 16, 16, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def result():  # type: ignore[no-untyped-def]
    return scan(sm.build_subclass_net(), _batches(), model_name="subclass")


def _fq(x: torch.Tensor, amax: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    return fake_quant(x, amax_to_scale(amax, 8, False), 8, False, axis)


def test_every_subclass_with_one_op_is_scanned_in_execution_order(result) -> None:  # type: ignore[no-untyped-def]
    assert [layer.name for layer in result.layers] == ["stem", "same", "std", "plain", "up", "head"]
    assert list(result.table["type"]) == [
        "Conv2dStaticSamePadding", "Conv2dSame", "StdConv2d", "PlainSub", "UpSame", "ScaledLinear",
    ]  # fmt: skip


def test_what_is_not_scanned_is_named_with_the_reason(result) -> None:  # type: ignore[no-untyped-def]
    assert set(result.unscanned) == {"twice", "scripted"}
    assert "2 times per call" in result.unscanned["twice"]
    assert "TorchScript" in result.unscanned["scripted"]
    assert any("2 conv-like layers were not scanned" in w for w in result.warnings)


def test_bn_folds_into_a_padding_subclass_but_not_into_weight_or_output_transforms(result) -> None:  # type: ignore[no-untyped-def]
    assert result.folded_bn == {"stem": "bn1"}  # std computes its weight; head scales its output
    std = next(layer for layer in result.layers if layer.name == "std")
    assert std.weight_transformed and "no SmoothQuant" in std.note


def test_weight_transforming_layer_gets_no_smoothquant_candidate(result) -> None:  # type: ignore[no-untyped-def]
    assert not any(k.startswith("alpha_sweep/std") for k in result.sweeps)
    assert any(k.startswith("alpha_sweep/stem") for k in result.sweeps)
    assert result.policy.method_for("std") in ("naive", "fp")


def test_quantized_twin_quantizes_what_reaches_the_op(result) -> None:  # type: ignore[no-untyped-def]
    """Exact (atol 0) against F.conv2d on the padded input and the (computed) weight, fake-quantized."""
    q = result.quantized_model("naive")
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        # padding subclass: the padded input is quantized, the stored weight per output channel
        same = q.same
        amax_in = same.input_quantizer.amax
        xp = F.pad(x, [1, 1, 1, 1])
        w = same.weight
        expected = F.conv2d(_fq(xp, amax_in), _fq(w, w.abs().amax(dim=(1, 2, 3)), 0), same.bias, 1, 0, 1, 8)
        torch.testing.assert_close(same(x), expected, rtol=0, atol=0)
        # weight standardization: the weight reaching the op is quantized with its own per-channel amax
        std = q.std
        ws = F.batch_norm(std.weight.reshape(1, 8, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        ws = ws.reshape_as(std.weight)
        expected = F.conv2d(_fq(x, std.input_quantizer.amax), _fq(ws, ws.abs().amax(dim=(1, 2, 3)), 0),
                            std.bias, 1, 1)  # fmt: skip
        torch.testing.assert_close(std(x), expected, rtol=0, atol=0)


def test_twins_subclass_the_users_class_and_run_its_forward() -> None:
    for mod in (sm.Conv2dSame(4, 4, 3), sm.StdConv2d(4, 4, 3), sm.ScaledLinear(4, 2), sm.UpSame(4, 4, 2, 2)):
        cls = quant_class_for(mod)
        assert cls is not None and issubclass(cls, type(mod)) and issubclass(cls, QuantWrapped)
    plain = quant_class_for(sm.PlainSub(4, 4))
    assert plain is not None and issubclass(plain, sm.PlainSub) and not issubclass(plain, QuantWrapped)
    assert (
        quant_class_for(quant_class_for(nn.Conv2d(2, 2, 1)).from_float(nn.Conv2d(2, 2, 1), QuantSpec()))
        is None
    )  # type: ignore[union-attr]
    assert not overrides_forward(sm.PlainSub) and overrides_forward(sm.Conv2dSame)


@pytest.mark.parametrize("make", [lambda: sm.Conv2dSame(3, 5, 3, stride=2), lambda: sm.UpSame(3, 5, 2, 2),
                                  lambda: sm.ScaledLinear(6, 3), lambda: sm.PlainSub(3, 3)])  # fmt: skip
def test_disabled_twin_equals_the_float_layer(make) -> None:  # type: ignore[no-untyped-def]
    mod = make().eval()
    x = torch.randn(2, 6) if isinstance(mod, nn.Linear) else torch.randn(2, 3, 9, 9)
    q = quant_class_for(mod).from_float(copy.deepcopy(mod), QuantSpec())  # type: ignore[union-attr]
    q.input_quantizer.set_amax(x.abs().max())
    q.input_quantizer.enabled = q.weight_quantizer.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(q(x), mod(x), rtol=0, atol=0)
        q.input_quantizer.enabled = q.weight_quantizer.enabled = True
        assert not torch.equal(q(x), mod(x))


def test_intercept_sees_only_its_modules_op() -> None:
    outer, inner = nn.Conv2d(3, 3, 1), sm.Conv2dSame(3, 3, 3)
    tap = OpIntercept("conv2d", keep_input=True)
    with during_forward(inner, tap):
        outer(inner(torch.randn(1, 3, 5, 5)))
    assert tap.calls == 1 and tap.last_input is not None and tap.last_input.shape[-1] == 7  # padded input
    assert "forward" not in inner.__dict__  # the instance override is gone


def test_intercepts_hold_no_tensor_unasked() -> None:
    """What an intercept keeps outlives the model's own reference: the padded input and the output of every
    TF-SAME conv, held through a forward, had been the scan's peak memory. Unasked, nothing is kept; asked,
    the input is let go once read (`LayerInputs`, once per call in the layer's hook)."""
    conv = sm.Conv2dSame(3, 3, 3)
    tap = OpIntercept("conv2d")
    with during_forward(conv, tap), torch.no_grad():
        out = conv(torch.randn(1, 3, 5, 5))
    assert tap.calls == 1 and tap.last_input is None and tap.last_output is None
    ref = weakref.ref(out)
    del out
    assert ref() is None  # the caller's output was the last reference
    seen: list[torch.Tensor | None] = []
    with layer_inputs(conv, [""]) as inputs, torch.no_grad():
        handle = conv.register_forward_hook(lambda m, a, o: seen.append(inputs("", a)))
        conv(torch.randn(1, 3, 5, 5))
        handle.remove()
        assert seen[0] is not None and seen[0].shape[-1] == 7  # the op's (padded) input
        assert inputs.taps[""].last_input is None  # let go once read


def test_cli_and_report_say_what_was_not_scanned(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(sm.build_subclass_net().state_dict(), tmp_path / "m.pth")
    torch.save(torch.cat(_batches()), tmp_path / "calib.pt")
    arch = f"{ROOT / 'tests' / 'subclass_models.py'}:build_subclass_net"
    out = tmp_path / "rep"
    assert main(["scan", str(tmp_path / "m.pth"), "--arch", arch, "--calib", str(tmp_path / "calib.pt"),
                 "--batch-size", "4", "--out", str(out), "-q"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "2 conv-like layers were not scanned" in err and "twice" in err
    scan_json = json.loads((out / "scan.json").read_text())
    assert set(scan_json["unscanned"]) == {"twice", "scripted"}
    html = (out / "report.html").read_text()
    assert 'id="unscanned"' in html and "<code>twice</code>" in html
    assert isinstance(torch.load(out / "model_quant.pt", weights_only=True), dict)


def test_quantmixin_layers_are_never_targets_again() -> None:
    q = quant_class_for(nn.Linear(2, 2)).from_float(nn.Linear(2, 2), QuantSpec())  # type: ignore[union-attr]
    assert isinstance(q, QuantMixin)
    from sensitivity.quant.registry import is_target

    assert not is_target(q) and is_target(sm.StdConv2d(2, 2, 1))
