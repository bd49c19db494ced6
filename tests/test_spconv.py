"""Quantized spconv layers: exact with quantization off, equal to quantized dense convs on the active sites,
SmoothQuant on sparse features, spconv's CPU pitfalls, and a clear error without spconv."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("spconv.pytorch", reason="the lidar extra (spconv) is not installed")

import spconv.pytorch as sp

from sensitivity import ScanOptions, scan
from sensitivity.demo.pointclouds import load_lamppost, voxelize
from sensitivity.integrations import spconv as integ
from sensitivity.quant.registry import is_target, quant_class_for
from sensitivity.spec import QuantSpec
from tests.models import Decode

# spconv's SparseConvTensor.dense() indexes with a list (a torch deprecation warning, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence:UserWarning")

ROOT = Path(__file__).resolve().parents[1]
U = 2.0**-24  # float32 unit roundoff


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)  # spconv's CPU kernels race with several threads (CENTERPOINT.md)


def lamppost_tensor(channels: int, seed: int = 0, voxel: float = 0.08) -> sp.SparseConvTensor:
    """The real lamppost scan voxelized (about 500 active sites on a [74, 13, 18] grid), random features."""
    pts = load_lamppost()
    extent = pts.max(axis=0) + voxel
    shape_xyz = [int(e // voxel) + 1 for e in extent]
    rng = (0.0, 0.0, 0.0, *(n * voxel for n in shape_xyz))
    _, coords, _ = voxelize(pts, (voxel, voxel, voxel), rng, max_points_per_voxel=1)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(coords), channels, generator=g)
    indices = F.pad(coords, (1, 0), value=0)
    return sp.SparseConvTensor(feats, indices, shape_xyz[::-1], 1)


def quantized(module: nn.Module, x: sp.SparseConvTensor, spec: QuantSpec | None = None) -> nn.Module:
    qmod = integ.sparse_quant_class_for(module).from_float(copy.deepcopy(module), spec or QuantSpec())
    qmod.input_quantizer.set_amax(x.features.abs().max())
    return qmod.eval()


def at_sites(dense: torch.Tensor, st: sp.SparseConvTensor) -> torch.Tensor:
    """Values of a dense [B, C, D, H, W] tensor at the sparse tensor's active sites, in its order."""
    i = st.indices.long()
    return dense[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]]


def test_sparse_conv_types_and_targets() -> None:
    types = integ.sparse_conv_types()
    for cls in (sp.SubMConv3d, sp.SparseConv3d, sp.SparseInverseConv3d, sp.SparseConvTranspose3d):
        assert cls in types
        assert integ.sparse_quant_class_for(cls(4, 4, 3, indice_key="k")).__name__ == f"Quant{cls.__name__}"
    assert integ.sparse_quant_class_for(sp.SparseSequential()) is None
    assert integ.sparse_quant_class_for(sp.SparseMaxPool3d(2)) is None
    conv = sp.SubMConv3d(4, 8, 3)
    assert is_target(conv) and integ.is_sparse_conv(conv)
    assert quant_class_for(conv) is integ.QuantSubMConv3d  # the class is reachable by name (pickling)
    assert not integ.is_sparse_conv(nn.Conv3d(4, 8, 3)) and not is_target(sp.SparseSequential())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("kind", ["subm", "strided", "inverse", "transposed", "subm2d"])
def test_disabled_quantization_equals_the_spconv_layer_exactly(kind: str, bias: bool) -> None:
    x = lamppost_tensor(8)
    down = sp.SparseConv3d(8, 8, 3, stride=2, padding=1, bias=False, indice_key="d").eval()
    if kind == "subm":
        layer, inp = sp.SubMConv3d(8, 16, 3, padding=1, bias=bias, indice_key="s"), x
    elif kind == "strided":
        layer, inp = sp.SparseConv3d(8, 16, 3, stride=2, padding=1, bias=bias), x
    elif kind == "inverse":
        layer = sp.SparseInverseConv3d(8, 16, 3, indice_key="d", bias=bias)
        with torch.no_grad():
            inp = down(x)
    elif kind == "transposed":
        layer, inp = sp.SparseConvTranspose3d(8, 16, 3, stride=2, padding=1, bias=bias), x
    else:  # a 2-D SubM conv on the lamppost's x-z footprint
        idx = torch.unique(x.indices[:, [0, 1, 3]], dim=0)
        feats = torch.randn(len(idx), 8, generator=torch.Generator().manual_seed(1))
        inp = sp.SparseConvTensor(feats, idx, [x.spatial_shape[0], x.spatial_shape[2]], 1)
        layer = sp.SubMConv2d(8, 16, 3, padding=1, bias=bias)
    qmod = quantized(layer, inp)
    qmod.input_quantizer.enabled = qmod.weight_quantizer.enabled = False
    with torch.no_grad():
        got = qmod(inp)
        # spconv's CPU kernels refuse a bias in eval mode; its train-mode forward adds it after the conv
        layer.train(bias)
        want = layer(inp)
    assert torch.equal(got.indices, want.indices)
    assert got.spatial_shape == want.spatial_shape
    assert torch.equal(got.features, want.features)  # bit for bit
    assert not qmod.training


def _dense_twin(layer: nn.Module, paired: nn.Module | None = None) -> nn.Module:
    """The dense torch conv computing the same map: weight [Cout, k, Cin] -> [Cout, Cin, k] (or, for
    inverse / transposed convs, [Cin, Cout, k]: spconv uses the same taps without flipping). An inverse
    conv takes its stride and padding from the conv it inverts (`paired`)."""
    w = layer.weight.detach()
    geometry = paired if paired is not None else layer
    k, s, p = layer.kernel_size, geometry.stride, geometry.padding
    has_bias = layer.bias is not None
    if layer.inverse or layer.transposed:
        dense = nn.ConvTranspose3d(
            layer.in_channels, layer.out_channels, k, stride=s, padding=p, bias=has_bias
        )
        dense.weight.data = w.permute(4, 0, 1, 2, 3).contiguous()
    else:
        dense = nn.Conv3d(layer.in_channels, layer.out_channels, k, stride=s, padding=p, bias=has_bias)
        dense.weight.data = w.permute(0, 4, 1, 2, 3).contiguous()
    if has_bias:
        dense.bias.data = layer.bias.detach().clone()
    return dense.eval()


@pytest.mark.parametrize("kind", ["subm", "strided", "inverse"])
def test_quantized_sparse_equals_quantized_dense_on_active_sites(kind: str) -> None:
    """Both sum the same fake-quantized products, in different orders: each result is within
    γ_n Σ|x_q w_q| of the exact sum (Higham's bound, n = k³·Cin + 1 terms with the bias, γ_n = nu/(1-nu)),
    so they differ by at most 2 γ_n Σ|x_q w_q| per output; the test uses that bound, computed per output."""
    torch.manual_seed(0)
    x = lamppost_tensor(16)
    down = sp.SparseConv3d(16, 16, 3, stride=2, padding=1, bias=False, indice_key="d").eval()
    if kind == "subm":
        layer, inp = sp.SubMConv3d(16, 24, 3, padding=1, bias=True, indice_key="s"), x
    elif kind == "strided":
        layer, inp = sp.SparseConv3d(16, 24, 3, stride=2, padding=1, bias=True), x
    else:
        layer = sp.SparseInverseConv3d(16, 24, 3, indice_key="d", bias=True)
        with torch.no_grad():
            inp = down(x)
    nn.init.uniform_(layer.bias, -0.5, 0.5)
    qs = quantized(layer, inp)
    dense = _dense_twin(layer, down if kind == "inverse" else None)
    qd = quant_class_for(dense).from_float(copy.deepcopy(dense), QuantSpec())
    qd.input_quantizer.set_amax(inp.features.abs().max())
    assert torch.equal(qs.weight_quantizer.amax, qd.weight_quantizer.amax)  # same per-channel ranges

    with torch.no_grad():
        ys = qs(inp)
        x_dense = inp.dense()
        if kind == "inverse":  # output size: the paired conv's input grid
            size = list(x.spatial_shape)
            yd = qd(x_dense, size)  # positional: QuantMixin.forward takes no keyword arguments
            xq_abs = qd.input_quantizer(x_dense).abs()
            terms = F.conv_transpose3d(
                xq_abs.double(), qd.quantized_weight().abs().double(), stride=2, padding=1,
                output_padding=[a - ((b - 1) * 2 - 2 + 3) for a, b in zip(size, x_dense.shape[2:], strict=True)],
            )  # fmt: skip
        else:
            yd = qd(x_dense)
            xq_abs = qd.input_quantizer(x_dense).abs()
            terms = F.conv3d(
                xq_abs.double(),
                qd.quantized_weight().abs().double(),
                stride=layer.stride,
                padding=layer.padding,
            )
        terms = terms + layer.bias.detach().abs().double().view(1, -1, 1, 1, 1)
        fp = layer.train()(inp)  # the unquantized output (train mode: spconv's CPU path for a bias)

    n = 27 * layer.in_channels + 1
    gamma = n * U / (1 - n * U)
    bound = 2 * gamma * at_sites(terms, ys)
    diff = (ys.features.double() - at_sites(yd, ys).double()).abs()
    assert (diff <= bound).all(), float((diff - bound).max())
    print(f"{kind}: max |sparse - dense| {float(diff.max()):.3g}, bound {float(bound.max()):.3g}")
    # the check is not vacuous: quantization moved the outputs by far more than the tolerance
    shift = (ys.features - fp.features).abs()
    assert shift.max() > 10 * bound.max() and shift.max() > 1e4 * diff.max()


def _rel_l1(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).abs().mean() / ref.abs().mean())


def test_smoothquant_on_sparse_features() -> None:
    torch.manual_seed(0)
    cin = 40
    x = lamppost_tensor(cin, seed=3)
    outliers = [3, 17]  # 5 % of the input channels, x50
    feats = x.features.clone()
    feats[:, outliers] *= 50.0
    x = x.replace_feature(feats)
    layer = sp.SubMConv3d(cin, 32, 3, padding=1, bias=False, indice_key="s").eval()
    with torch.no_grad():
        ref = layer(x).features

    x_max = x.features.abs().amax(dim=0).clamp(min=1e-5)
    qmod = quantized(layer, x)
    w_max = qmod.weight_input_absmax().clamp(min=1e-5)
    assert w_max.shape == (cin,)
    assert torch.equal(w_max, layer.weight.detach().abs().amax(dim=(0, 1, 2, 3)))
    s = x_max.sqrt() / w_max.sqrt()  # alpha = 0.5

    # quantization off: x / s then W * s is the same layer (up to float rounding)
    qmod.input_quantizer.enabled = qmod.weight_quantizer.enabled = False
    qmod.set_smoothing(s)
    with torch.no_grad():
        smoothed_fp = qmod(x).features
    assert _rel_l1(smoothed_fp, ref) < 1e-5
    assert torch.allclose(smoothed_fp, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))

    qmod.input_quantizer.enabled = qmod.weight_quantizer.enabled = True
    qmod.set_smoothing(None)
    with torch.no_grad():
        naive = _rel_l1(qmod(x).features, ref)
        qmod.set_smoothing(s)
        qmod.input_quantizer.set_amax((x.features / s).abs().max())
        smooth = _rel_l1(qmod(x).features, ref)
    print(f"isolated relative L1: naive {naive:.4f}, SmoothQuant {smooth:.4f}")
    assert smooth * 2 <= naive, (naive, smooth)


def test_cpu_bias_fallback_makes_the_fp_layer_run_and_survives_deepcopy_and_eval() -> None:
    x = lamppost_tensor(8)
    model = sp.SparseSequential(sp.SubMConv3d(8, 8, 3, padding=1, bias=True, indice_key="s")).eval()
    with pytest.raises(AssertionError, match="cpu don't support act and bias"), torch.no_grad():
        model(x)  # spconv 2.3.8 on CPU, as OpenPCDet's SparseBasicBlock convs hit it
    with torch.no_grad():
        want = model.train()(x).features
    model.eval()
    with integ.cpu_bias_fallback(model):
        fp = copy.deepcopy(model).eval()  # what the scan's prepare() does
    with torch.no_grad():
        got = fp(x).features
    assert torch.equal(got, want)
    assert not fp.training and not fp[0].training  # the conv is put back in eval mode after its call
    assert not model[0]._forward_pre_hooks  # the context removed its hooks from the original
    assert len(integ.add_cpu_bias_fallback_(fp)) == 0  # idempotent: already installed


def test_single_thread_if_sparse(caplog: pytest.LogCaptureFixture) -> None:
    torch.set_num_threads(2)
    sparse = sp.SparseSequential(sp.SubMConv3d(4, 4, 3))
    monkey = pytest.MonkeyPatch()
    monkey.setattr(integ, "_logged_single_thread", False)
    try:
        with caplog.at_level(logging.INFO, logger=integ.__name__):
            with integ.single_thread_if_sparse(sparse) as did:
                assert did and torch.get_num_threads() == 1
            assert torch.get_num_threads() == 2
            with integ.single_thread_if_sparse(sparse):
                pass
            with integ.single_thread_if_sparse(nn.Conv2d(3, 3, 3)) as did:
                assert not did and torch.get_num_threads() == 2
    finally:
        monkey.undo()
        torch.set_num_threads(1)
    assert sum("1 torch thread" in r.getMessage() for r in caplog.records) == 1  # logged once


class SparseExpHead(nn.Module):
    """test_scan's ExpHead with sparse convs: `dim`'s input has 7 channels at 1 and one at 1e5 (its weight
    compensates), so FP dim = bias - 6; per-tensor input quantization (amax 1e5) zeroes the ordinary
    channels and the tiny weight, dim = bias, and exp(gain * bias) overflows float32."""

    def __init__(self, bias: float = 5.0, gain: float = 20.0) -> None:
        super().__init__()
        self.stem = sp.SubMConv3d(4, 8, 3, padding=1, bias=True, indice_key="s")
        self.dim = sp.SubMConv3d(8, 1, 3, padding=1, bias=True, indice_key="s")
        scale = torch.ones(8)
        scale[1] = 1e5
        self.register_buffer("scale", scale)
        with torch.no_grad():
            self.stem.weight.zero_()
            self.stem.bias.fill_(1.0)
            self.dim.weight.zero_()
            self.dim.weight[:, 1, 1, 1, :] = -1.0  # centre tap only
            self.dim.weight[:, 1, 1, 1, 1] = 1e-5
            self.dim.bias.fill_(bias)
        self.decode = Decode(gain)

    def forward(self, batch: dict) -> dict:
        x = sp.SparseConvTensor(batch["features"], batch["indices"], batch["shape"].tolist(), 1)
        h = self.stem(x)
        h = h.replace_feature(F.relu(h.features) * self.scale)
        return {"dim": self.decode(self.dim(h).features)}


def test_scan_names_the_first_nonfinite_sparse_layer_and_excludes_its_cause() -> None:
    x = lamppost_tensor(4)
    batches = [
        {"features": x.features * (1 + i), "indices": x.indices, "shape": torch.tensor(x.spatial_shape)}
        for i in range(4)
    ]
    model = SparseExpHead()
    with integ.cpu_bias_fallback(model):
        with torch.no_grad():
            assert torch.isfinite(model(batches[0])["dim"]).all()
        result = scan(model, batches, ScanOptions(outputs=("dim",)))
    assert list(result.table.index) == ["stem", "dim"]
    # spconv's CPU backward (inside the scan's context) carries the probes through `dim` to `stem`
    assert result.table["out_err_source"].str.startswith("probe").all()
    assert result.first_nonfinite == "decode"
    assert list(result.excluded) == ["dim"]
    assert result.policy_first_nonfinite is None
    comp = result.comparison.set_index("config")
    assert comp.loc["naive", "out_nonfinite"] > 0 and comp.loc["naive+exclusion", "out_nonfinite"] == 0


_NO_SPCONV = textwrap.dedent(
    """
    import sys
    sys.modules["spconv"] = None  # as if spconv were not installed
    import torch
    from torch import nn
    import sensitivity
    from sensitivity.errors import SensitivityError
    from sensitivity import scan
    from tests.models import TinyConvNet

    batches = [torch.randn(4, 3, 12, 12) for _ in range(3)]
    result = scan(TinyConvNet(), batches)
    print("DENSE", len(result.table))

    class SubMConv3d(nn.Identity):  # stands for a layer of a model built where spconv was available
        pass

    SubMConv3d.__module__ = "spconv.pytorch.conv"
    try:
        scan(nn.Sequential(nn.Conv2d(3, 4, 3), SubMConv3d()), batches)
    except SensitivityError as e:
        print("SCAN", type(e).__name__, e)
    try:
        import sensitivity.demo.centerpoint
    except SensitivityError as e:
        print("DEMO", type(e).__name__, e)
    """
)


def test_without_spconv_dense_models_scan_and_sparse_ones_name_the_extra() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_SPCONV], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "DENSE 5" in lines
    for tag in ("SCAN", "DEMO"):
        line = next(x for x in lines if x.startswith(tag))
        assert "SpconvUnavailableError" in line and "pip install 'sensitivity[lidar]'" in line
        assert "spconv-cu120" in line


_PUBLIC_API = textwrap.dedent(
    """
    import sys, torch
    import spconv.pytorch as sp
    import sensitivity
    from sensitivity.demo.pointclouds import load_lamppost, voxelize

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = sp.SubMConv3d(4, 8, 3, indice_key="a")
            self.b = sp.SparseConv3d(8, 8, 3, stride=2)
            self.fc = torch.nn.Linear(8, 2)
        def forward(self, st):
            return self.fc(self.b(self.a(st)).features)

    torch.manual_seed(0)
    print("LOADED BEFORE", "sensitivity.integrations.spconv" in sys.modules)
    def frame(seed):
        g = torch.Generator().manual_seed(seed)
        flat = torch.randperm(16 * 16 * 8, generator=g)[:300]
        zyx = torch.stack([flat // 256, flat // 16 % 16, flat % 16], 1)
        indices = torch.cat([torch.zeros(300, 1, dtype=torch.long), zyx], 1).int()
        return sp.SparseConvTensor(torch.randn(300, 4, generator=g), indices, [8, 16, 16], 1)

    batches = [frame(i) for i in range(4)]
    result = sensitivity.scan(Net(), batches)
    print("LAYERS", ",".join(result.table.index))
    print("QUANTIZED", type(sensitivity.apply_policy(Net(), result.policy, result.quant_state).a).__name__)
    print("USER INDICES UNTOUCHED", all(not b.indice_dict for b in batches))
    """
)


def test_the_public_api_loads_spconv_support_by_itself() -> None:
    """`sensitivity.scan()` on a sparse model in a fresh process: the spconv family registers itself."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _PUBLIC_API], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LOADED BEFORE False" in proc.stdout
    assert "LAYERS a,b,fc" in proc.stdout and "QUANTIZED QuantSubMConv3d" in proc.stdout
    assert "USER INDICES UNTOUCHED True" in proc.stdout


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_sparse_tensor_batch_with_nonfinite_features_is_one_line(bad: float) -> None:
    """SparseConvTensor batches are checked like tensors: a non-finite feature names the batch."""
    from sensitivity import scan
    from sensitivity.errors import CalibrationDataError

    net = nn.Sequential(sp.SubMConv3d(4, 4, 3, indice_key="a"), sp.ToDense())
    good = lamppost_tensor(4)
    broken = lamppost_tensor(4, seed=1)
    broken.features[7, 2] = bad
    with pytest.raises(CalibrationDataError, match=r"calibration batch 1 .*non-finite"):
        scan(net, [good, broken])


def _pairs_by_hand(indices: torch.Tensor, shape: list[int], kernel: int, stride: int, subm: bool) -> int:
    """Rule-book size counted from the active sites alone: (output, input) pairs within a kernel window."""
    coords, dims = indices[:, 1:].long(), torch.tensor(shape)

    def key(c: torch.Tensor) -> list[int]:
        return ((c[:, 0] * dims[1] + c[:, 1]) * dims[2] + c[:, 2]).tolist()

    active = set(key(coords))
    r = range(kernel)
    offsets = torch.tensor([(a, b, c) for a in r for b in r for c in r])
    pairs = 0
    if subm:  # outputs are the inputs; a tap pairs an output with an active neighbour
        for o in offsets:
            c = coords + o - kernel // 2
            inside = ((c >= 0) & (c < dims)).all(1)
            pairs += sum(k in active for k in key(c[inside]))
        return pairs
    out_dims = (dims - kernel) // stride + 1
    for o in offsets:  # input site p feeds output q where p = q * stride + o (no padding)
        q = coords - o
        q = q[(q % stride == 0).all(1)] // stride
        pairs += int(((q >= 0) & (q < out_dims)).all(1).sum())
    return pairs


def test_sparse_conv_macs_count_the_rule_book() -> None:
    """MACs of a sparse conv: rule-book pairs x Cin x Cout (the issue: conv_input.0 read 13.6 M, the
    output-channel factor short of even the upper bound); the upper bound where spconv keeps no pairs."""
    from sensitivity.quant.registry import layer_macs

    x = lamppost_tensor(4)
    n = len(x.indices)
    for conv, subm in (
        (sp.SubMConv3d(4, 16, 3, padding=1, bias=False, indice_key="subm1"), True),
        (sp.SparseConv3d(4, 8, 3, stride=2, bias=False, indice_key="down1"), False),
    ):
        with torch.no_grad():
            y = conv.eval()(x)
        pairs = _pairs_by_hand(x.indices, list(x.spatial_shape), 3, 1 if subm else 2, subm)
        assert integ.rule_pairs(conv, y) == pairs
        macs = layer_macs(conv, tuple(x.features.shape), tuple(y.features.shape), y)
        assert macs == pairs * 4 * conv.out_channels
        assert macs <= len(y.features) * conv.weight.numel()  # within the upper bound
    plain = sp.SubMConv3d(4, 16, 3, padding=1, bias=False).eval()  # no indice_key: no rule book kept
    with torch.no_grad():
        y = plain(x)
    assert integ.rule_pairs(plain, y) is None
    assert layer_macs(plain, (n, 4), (n, 16), y) == n * 16 * 27 * 4


@pytest.mark.parametrize("kind", ["subm", "strided"])
def test_sparse_layers_have_a_backward_on_cpu_inside_the_scans_context(kind: str) -> None:
    """The output probes differentiate through spconv layers on CPU (spconv's own gather-mm-scatter
    backward, inside `cpu_backward`): the input-feature gradient equals dense Conv3d's at the active sites,
    to float32 summation order (atol 1e-5 on gradients of order 1)."""
    torch.manual_seed(0)
    x = lamppost_tensor(8)
    if kind == "subm":
        layer = sp.SubMConv3d(8, 12, 3, padding=1, bias=True, indice_key="s")
    else:
        layer = sp.SparseConv3d(8, 12, 3, stride=2, padding=1, bias=True)
    feats = x.features.clone().requires_grad_()
    inp = x.replace_feature(feats)
    with integ.cpu_backward():
        y = layer(inp)
        r = torch.randn(y.features.shape, generator=torch.Generator().manual_seed(1))
        (grad,) = torch.autograd.grad((y.features * r).sum(), feats)
    dense = _dense_twin(layer)
    x_dense = x.dense().requires_grad_()
    yd = dense(x_dense)
    i = y.indices.long()
    rd = torch.zeros_like(yd)
    rd[i[:, 0], :, i[:, 1], i[:, 2], i[:, 3]] = r
    (gd,) = torch.autograd.grad((yd * rd).sum(), x_dense)
    torch.testing.assert_close(grad, at_sites(gd, x), rtol=0, atol=1e-5)
    with pytest.raises(AssertionError, match="CUDA"):  # outside the context spconv asks for a CUDA stream
        y = layer(x.replace_feature(x.features.clone().requires_grad_()))
        y.features.sum().backward()
