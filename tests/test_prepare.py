"""BN folding proven by the eager dataflow, target discovery, execution order, no mutation."""

from __future__ import annotations

import hashlib
import itertools
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from sensitivity import ScanOptions
from sensitivity.graph import _Recorder, record_dataflow
from sensitivity.prepare import find_targets, prepare
from sensitivity.quant.registry import is_target
from tests.models import TinyConvNet


def _param_hash(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def _randomize_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def test_fold_bn_is_exact_and_model_untouched() -> None:
    model = TinyConvNet().eval()
    _randomize_bn(model)
    before = _param_hash(model)
    x = torch.randn(2, 3, 12, 12)
    prep = prepare(model, x)
    assert prep.folded == {"stem.0": "stem.1", "conv1": "bn1"}
    assert isinstance(prep.model.bn1, nn.Identity)
    with torch.no_grad():
        # folding reorders float ops: equal to float32 rounding (outputs are O(1))
        torch.testing.assert_close(prep.model(x), model(x), rtol=1e-5, atol=1e-5)
    assert _param_hash(model) == before
    assert isinstance(model.bn1, nn.BatchNorm2d)
    assert prep.names == ["stem.0", "conv1", "dw", "pw", "fc"]


class Deblocks(nn.Module):
    """OpenPCDet's BEV deblocks: ConvTranspose (bias=False) -> BN -> ReLU; one with groups, not folded."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(4, 6, 2, stride=2, bias=False), nn.BatchNorm2d(6), nn.ReLU()
        )
        self.grouped = nn.Sequential(nn.ConvTranspose2d(6, 4, 3, padding=1, groups=2), nn.BatchNorm2d(4))
        self.up3d = nn.Sequential(nn.ConvTranspose3d(2, 3, (1, 2, 2), stride=(1, 2, 2)), nn.BatchNorm3d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.grouped(self.up(x))
        return y.sum() + self.up3d(y[:, :2, None]).sum()


def test_fold_bn_into_conv_transpose() -> None:
    """Its weight is [Cin, Cout/groups, k...]: BN scales axis 1 (the issue: deblocks' BNs stayed in ONNX)."""
    model = Deblocks().eval()
    _randomize_bn(model)
    for bn in (model.up3d[1],):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 5, 5)
    prep = prepare(model, x)
    assert prep.folded == {"up.0": "up.1", "up3d.0": "up3d.1"}  # the grouped one is left alone
    assert isinstance(prep.model.up[1], nn.Identity) and isinstance(prep.model.grouped[1], nn.BatchNorm2d)
    assert prep.model.up[0].bias is not None
    with torch.no_grad():
        torch.testing.assert_close(prep.model.up(x), model.up(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prep.model(x), model(x), rtol=1e-5, atol=1e-4)


class SharedConvOutput(nn.Module):
    """conv's output feeds BN *and* a residual add: folding BN into conv would change the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return F.relu(self.bn(y)) + y


class BNTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.bn(x)


def test_fold_refused_when_conv_output_has_other_consumers() -> None:
    for cls in (SharedConvOutput, BNTwice):
        model = cls().eval()
        _randomize_bn(model)
        x = torch.randn(1, 4, 6, 6)
        prep = prepare(model, x)
        assert prep.folded == {}, cls.__name__
        with torch.no_grad():
            torch.testing.assert_close(prep.model(x), model(x), rtol=0, atol=0)


def test_dataflow_sees_functional_consumers_and_inplace_versions() -> None:
    model = SharedConvOutput().eval()
    flow = record_dataflow(model, torch.randn(1, 4, 6, 6))
    conv = flow.module_calls("conv")[0]
    assert len(flow.consumers[conv.outputs[0]]) == 2  # bn and the functional add
    assert flow.sole_consumer(conv.outputs[0]) is None


class _Chain(nn.Module):
    """Notes, at the end of its forward, which of its activations are still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(4))
        self.alive: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        refs = []
        for conv in self.convs:
            x = F.relu(conv(x))
            refs.append(weakref.ref(x))
        self.alive = [r() is not None for r in refs]
        return x


def test_dataflow_recording_keeps_no_activation_alive() -> None:
    """The recording once kept every tensor alive (so that ids were not reused): a whole forward's
    activations at once, 4x a plain forward's memory and time on OpenPCDet's CenterPoint."""
    model = _Chain().eval()
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        model(x)
    plain = list(model.alive)
    flow = record_dataflow(model, x)
    assert plain == [False, False, False, True]
    assert model.alive == plain
    order = flow.module_order()
    assert order == ["convs.0", "convs.1", "convs.2", "convs.3"]
    for a, b in itertools.pairwise(order):  # conv -> relu -> conv: each relu's output feeds the next conv
        relu = flow.nodes[flow.producer[flow.module_calls(b)[0].inputs[0]]]
        assert relu.name == "relu"
        assert flow.nodes[flow.producer[relu.inputs[0]]].name == a


def test_dataflow_gives_a_reused_id_a_new_value() -> None:
    rec = _Recorder()
    first = torch.zeros(3)
    key, where = rec.key(first), id(first)
    assert rec.key(first) == key
    first.add_(1)
    assert rec.key(first) == (key[0], key[1] + 1)  # in place: the same tensor, a new version
    del first
    reused = None
    for _ in range(1000):  # CPython hands the freed object's memory out again almost at once
        t = torch.zeros(3)
        if id(t) == where:
            reused = t
            break
        del t
    assert reused is not None
    assert rec.key(reused)[0] != key[0]


def test_only_and_skip_globs() -> None:
    model = TinyConvNet()

    def targets(**globs: tuple[str, ...]) -> list[str]:
        return find_targets(model, ScanOptions(**globs).selection)

    assert targets(only=("stem.*",)) == ["stem.0"]
    assert targets(skip=("**",)) == []
    assert targets(skip=("fc", "d*")) == ["stem.0", "conv1", "pw"]
    assert ScanOptions(only=("stem.*",), skip=("stem.0",)).selection("stem.0") == "matched --skip"
    assert ScanOptions(only=("stem.*",)).selection("fc") == "not in --only"


def test_subclassed_layers_are_targets_and_quantized_at_their_op() -> None:
    """Once skipped silently (an EfficientNet scanned 1 of 50 convs): tests/test_subclass_convs.py has the rest."""

    class MyConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = nn.Sequential(MyConv(3, 3, 1), nn.Conv2d(3, 3, 1))
    assert find_targets(model) == ["0", "1"]


def _canonical(flow) -> tuple:  # type: ignore[no-untyped-def]
    """The flow with values numbered by first appearance (serials differ between recordings)."""
    ids: dict[tuple[int, int], int] = {}

    def c(keys: list[tuple[int, int]]) -> list[int]:
        return [ids.setdefault(k, len(ids)) for k in keys]

    nodes = [(n.kind, n.name, type(n.module).__name__, c(n.inputs), c(n.outputs)) for n in flow.nodes]
    producer = sorted((ids[k], i) for k, i in flow.producer.items())
    consumers = sorted((ids[k], tuple(v)) for k, v in flow.consumers.items() if k in ids)
    return nodes, producer, consumers, sorted(ids[k] for k in flow.outputs if k in ids)


class _BNOutputs(nn.Module):
    """BN outputs written in place twice, used twice, and returned as a model output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.up, self.b3 = nn.ConvTranspose2d(8, 4, 2, stride=2), nn.BatchNorm2d(4)
        self.fc, self.b4 = nn.Linear(4, 5), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.b1(self.c1(x)).relu_().mul_(0.5)
        b = self.b2(self.c2(a))
        u = F.relu(self.b3(self.up(a + b)))
        return b, self.b4(self.fc(u.mean((2, 3))))


class _Blocks(nn.Module):
    """A ResNet basic block (BN, in-place ReLU, residual add into a BN output) and a MobileNetV2 inverted
    residual (depthwise conv, in-place ReLU6, a BN whose conv is not folded: its output has two users)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True))
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.expand = nn.Sequential(nn.Conv2d(c, 4 * c, 1, bias=False), nn.BatchNorm2d(4 * c), nn.ReLU6(True))
        self.dw = nn.Sequential(
            nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4 * c, bias=False),
            nn.BatchNorm2d(4 * c),
            nn.ReLU6(True),
        )
        self.project, self.bn3 = nn.Conv2d(4 * c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.shared = nn.Conv2d(c, c, 1)
        self.bn_shared = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))
        out += x
        x = out.relu_()
        x = x + self.bn3(self.project(self.dw(self.expand(x))))
        s = self.shared(x)
        return self.bn_shared(s) + s


def test_the_folded_dataflow_is_derived_as_a_recording_would_give_it() -> None:
    """`without_folded` (no second forward) against a recording of the folded model: the same nodes, values,
    producers, consumers and model outputs, on a zoo of BN placements and on the CenterPoint-shaped
    detector (spconv, BatchNorm1d after sparse convs, dict outputs)."""
    from sensitivity.demo import centerpoint as cp
    from sensitivity.demo import centerpoint_train as cpt

    torch.manual_seed(0)
    cases: list[tuple[nn.Module, object]] = [
        (_BNOutputs().eval(), torch.randn(2, 3, 8, 8)),
        (_Blocks().eval(), torch.randn(2, 3, 16, 16)),
        (cp.build_centerpoint().eval(), cpt.lidar_batches(1)[0]),
    ]
    for model, batch in cases:
        _randomize_bn(model)
        prep = prepare(model, batch)
        assert prep.folded, type(model).__name__
        if isinstance(model, _Blocks):
            assert "shared" not in prep.folded and len(prep.folded) == 6
        leaves = {n for n, m in prep.model.named_modules() if n and is_target(m)}
        recorded = record_dataflow(prep.model, batch, leaves=leaves)
        assert _canonical(prep.flow) == _canonical(recorded), type(model).__name__
