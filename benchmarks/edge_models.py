"""Edge-model shapes in plain torch (no torchvision / timm / ultralytics), for timing the scan.

MobileNetV2 (torchvision's module names), EfficientNet-Lite0 (efficientnet-pytorch's names, TF "SAME"
padding done inside a Conv2d subclass as that package does) and YOLOv8n (ultralytics' yolov8.yaml at
depth 0.33 / width 0.25, its module names, raw head output). Random weights with realistic BatchNorm
statistics: these are shapes for timing, not trained models (see trained_mobilenet.py for that).

Usage: .venv/bin/python benchmarks/edge_models.py [--batch 8] [--models mobilenet_v2,yolov8n]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # imported as benchmarks.edge_models (e.g. `--arch benchmarks.edge_models:yolov8n`)
    from .yolov8 import YOLOv8
except ImportError:  # run as a script, or loaded by file path with this folder on sys.path
    from yolov8 import YOLOv8  # type: ignore[no-redef]

__all__ = [
    "MODELS",
    "Conv2dStaticSamePadding",
    "build",
    "count_targets",
    "efficientnet_lite0",
    "efficientnet_lite0_plain",
    "input_size",
    "mobilenet_v2",
    "yolov8n",
]


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor` (never down by more than 10%), as both papers' code does."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _realistic_bn_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-identity BN statistics (as benchmarks/resnets.py), so BN folding does real work."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)  # type: ignore[union-attr]
            m.running_var.uniform_(0.5, 1.5, generator=g)  # type: ignore[union-attr]
            m.weight.data.uniform_(0.5, 1.0, generator=g)
            m.bias.data.uniform_(-0.1, 0.1, generator=g)
    return model


# ------------------------------------------------------------------------------------------ MobileNetV2


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias) -> BN -> ReLU6; torchvision's Conv2dNormActivation names (0, 1, 2)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when t == 1), depthwise 3x3, linear project 1x1; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = round(cin * t)
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = [] if t == 1 else [ConvBNReLU6(cin, hidden, 1)]
        layers += [
            ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


# t (expansion), c (output channels), n (repeats), s (first stride): Table 2 of the MobileNetV2 paper.
MBV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))  # fmt: skip


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's module names (features.N..., classifier.1)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        cin = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        feats: list[nn.Module] = [ConvBNReLU6(3, cin, 3, 2)]
        for t, c, n, s in MBV2_SETTINGS:
            cout = _make_divisible(c * width)
            for i in range(n):
                feats.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        feats.append(ConvBNReLU6(cin, last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    """MobileNetV2 (52 convs + 1 Linear at width 1.0), random weights, realistic BN statistics."""
    return _realistic_bn_(MobileNetV2(num_classes, width)).eval()


# ------------------------------------------------------------------------------------ EfficientNet-Lite0


class Conv2dStaticSamePadding(nn.Conv2d):
    """TF "SAME" padding for a fixed input size, applied in forward (efficientnet-pytorch's class).

    The padding (asymmetric for stride 2 on even sizes) is a ZeroPad2d child, so this conv subclass has
    its own forward and a submodule: the kind of layer real EfficientNet code feeds a quantization tool.
    """

    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, image_size: int = 224, **kw: Any
    ) -> None:
        super().__init__(cin, cout, k, stride, **kw)
        ih = iw = image_size
        kh, kw_ = self.weight.shape[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * sh + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * sw + (kw_ - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            self.static_padding: nn.Module = nn.ZeroPad2d(pads)
        else:
            self.static_padding = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _conv_factory(same_padding: bool) -> Callable[..., nn.Conv2d]:
    """Conv2dStaticSamePadding, or a plain nn.Conv2d with symmetric k // 2 padding (timm's lite style)."""

    def make(cin: int, cout: int, k: int, stride: int = 1, image_size: int = 224, **kw: Any) -> nn.Conv2d:
        if same_padding:
            return Conv2dStaticSamePadding(cin, cout, k, stride, image_size=image_size, **kw)
        return nn.Conv2d(cin, cout, k, stride, padding=k // 2, **kw)

    return make


class MBConvBlock(nn.Module):
    """EfficientNet-Lite MBConv: expand 1x1 (when e != 1), depthwise k x k, project 1x1; no SE, ReLU6."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, e: int, image_size: int,
                 conv: Callable[..., nn.Conv2d]) -> None:  # fmt: skip
        super().__init__()
        hidden = cin * e
        bn = {"momentum": 0.01, "eps": 1e-3}  # TF's BN settings (efficientnet-pytorch's defaults)
        self.id_skip = stride == 1 and cin == cout
        self._expand_conv: nn.Module | None = None
        if e != 1:
            self._expand_conv = conv(cin, hidden, 1, image_size=image_size, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, **bn)
        self._depthwise_conv = conv(
            hidden, hidden, k, stride, image_size=image_size, groups=hidden, bias=False
        )
        self._bn1 = nn.BatchNorm2d(hidden, **bn)
        out_size = math.ceil(image_size / stride)
        self._project_conv = conv(hidden, cout, 1, image_size=out_size, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **bn)
        self._relu = nn.ReLU6(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self._expand_conv is not None:
            y = self._relu(self._bn0(self._expand_conv(y)))
        y = self._relu(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.id_skip else y


# repeats, kernel, first stride, expansion, in, out: EfficientNet-B0's table (Lite0 scales neither).
B0_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
             (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))  # fmt: skip


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 with efficientnet-pytorch's names (_conv_stem, _blocks.N._depthwise_conv, _fc)."""

    def __init__(self, num_classes: int = 1000, same_padding: bool = True, image_size: int = 224) -> None:
        super().__init__()
        conv = _conv_factory(same_padding)
        bn = {"momentum": 0.01, "eps": 1e-3}
        self._conv_stem = conv(3, 32, 3, 2, image_size=image_size, bias=False)  # stem fixed at 32 in Lite
        self._bn0 = nn.BatchNorm2d(32, **bn)
        size = math.ceil(image_size / 2)
        blocks: list[nn.Module] = []
        for repeats, k, s, e, cin, cout in B0_BLOCKS:
            for i in range(repeats):
                stride = s if i == 0 else 1
                blocks.append(MBConvBlock(cin if i == 0 else cout, cout, k, stride, e, size, conv))
                size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = conv(320, 1280, 1, image_size=size, bias=False)  # head fixed at 1280 in Lite
        self._bn1 = nn.BatchNorm2d(1280, **bn)
        self._relu = nn.ReLU6(inplace=False)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._relu(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._relu(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(torch.flatten(self._avg_pooling(x), 1)))


def efficientnet_lite0(
    num_classes: int = 1000, same_padding: bool = True, image_size: int = 224
) -> nn.Module:
    """EfficientNet-Lite0 (49 convs + 1 Linear); `same_padding=False` builds plain nn.Conv2d instead.

    Both variants have the same state-dict keys (the padding modules hold no tensors).
    """
    return _realistic_bn_(EfficientNetLite(num_classes, same_padding, image_size)).eval()


def efficientnet_lite0_plain(num_classes: int = 1000, image_size: int = 224) -> nn.Module:
    """EfficientNet-Lite0 with plain nn.Conv2d (symmetric padding): a named factory for `--arch`."""
    return efficientnet_lite0(num_classes, same_padding=False, image_size=image_size)


# ----------------------------------------------------------------------------------------------- YOLOv8n


def yolov8n(num_classes: int = 80) -> nn.Module:
    """YOLOv8n (64 convs: 63 + the DFL's fixed 1x1); output [N, 4 + classes, anchors] (2100 at 320)."""
    return _realistic_bn_(YOLOv8(num_classes)).eval()


# ------------------------------------------------------------------------------------------- registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mobilenet_v2": mobilenet_v2,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite0_plain": efficientnet_lite0_plain,
    "yolov8n": yolov8n,
}


def build(name: str, **kwargs: Any) -> nn.Module:
    """A model of the registry by name (random weights, eval mode)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    return MODELS[name](**kwargs)


def input_size(name: str) -> int:
    """Image side the benchmarks feed this model (320 for YOLO, 224 otherwise)."""
    return 320 if name.startswith("yolo") else 224


def count_targets(model: nn.Module) -> int:
    """Conv / Linear modules, subclasses included (what a quantization tool should find)."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
    return sum(isinstance(m, kinds) for m in model.modules())


def main() -> None:
    """Per model: parameters, target layers and the median time of one FP forward."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.models.split(","):
        model = build(name)
        size = input_size(name)
        x = torch.randn(args.batch, 3, size, size)
        times = []
        with torch.no_grad():
            model(x)  # warm-up
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = model(x)
                times.append(time.perf_counter() - t0)
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<26} params {params / 1e6:6.2f} M  targets {count_targets(model):3d}  "
              f"forward [{args.batch},3,{size},{size}] {sorted(times)[len(times) // 2] * 1e3:7.1f} ms  "
              f"out {tuple(out.shape)}  threads {torch.get_num_threads()}")  # fmt: skip


if __name__ == "__main__":
    main()
