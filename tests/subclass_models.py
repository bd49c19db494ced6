"""Conv / Linear subclasses as real code writes them (EfficientNet, timm, mmcv-style), for the tests.

Each pads its input, transforms its weight, or adds plumbing in its own `forward`; the toolkit must
quantize the tensors that reach the op, not skip the layer or drop its forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Conv2dStaticSamePadding(nn.Conv2d):
    """efficientnet-pytorch's TF "SAME" conv: a padding submodule applied in forward, then F.conv2d."""

    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, image_size: int = 16, **kw: object
    ) -> None:
        super().__init__(cin, cout, k, stride, **kw)  # type: ignore[arg-type]
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + k - image_size, 0)
        half = pad // 2
        self.static_padding = nn.ZeroPad2d((half, pad - half, half, pad - half)) if pad else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm's dynamic "SAME" conv: pads with F.pad from the input size, then the base `_conv_forward`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return self._conv_forward(x, self.weight, self.bias)


class StdConv2d(nn.Conv2d):
    """timm's weight-standardized conv (BiT): the weight reaching the op is computed in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=1e-6
        ).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledLinear(nn.Linear):
    """A Linear whose forward post-scales the op output (so BN may not fold into it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) * 0.5


class PlainSub(nn.Conv2d):
    """A subclass that only changes construction: the base forward serves."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 1)


class UpSame(nn.ConvTranspose2d):
    """A transposed conv subclass that crops its output in forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[..., :-1, :-1]


class Twice(nn.Conv2d):
    """Calls its op twice per call: no single quantized op, so it is not scanned (and said so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight, self.bias) + self._conv_forward(x, self.weight, self.bias)


class SubclassNet(nn.Module):
    """Every kind above in one model, with BatchNorms after the padded and the standardized conv, and a
    TorchScript submodule holding a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = Conv2dStaticSamePadding(3, 8, 3, stride=2, image_size=16, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.same = Conv2dSame(8, 8, 3, groups=8)
        self.std = StdConv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.plain = PlainSub(8, 8)
        self.up = UpSame(8, 8, 2, stride=2)
        self.twice = Twice(8, 8, 1)
        self.scripted = torch.jit.script(nn.Conv2d(8, 8, 1))
        self.head = ScaledLinear(8, 4)
        self.bn3 = nn.BatchNorm1d(4)
        g = torch.Generator().manual_seed(0)
        for bn in (self.bn1, self.bn2, self.bn3):
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.stem(x)))
        x = self.same(x)
        x = torch.relu(self.bn2(self.std(x)))
        x = self.up(self.plain(x))
        x = self.scripted(self.twice(x))
        return self.bn3(self.head(x.mean(dim=(2, 3))))


def build_subclass_net() -> SubclassNet:
    return SubclassNet().eval()
