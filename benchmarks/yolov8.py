"""YOLOv8 in plain torch: ultralytics' yolov8.yaml graph and module names (model.N, model.22 = Detect).

Conv = Conv2d + BN + SiLU, C2f blocks, SPPF, the PAN neck (Upsample + concat), the decoupled Detect head
with DFL decoding; the output is the raw head tensor [N, 4 + classes, anchors] of ultralytics' inference
mode (box xywh in pixels, class sigmoids). Used by edge_models.py, which adds realistic BN statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SPPF", "C2f", "Conv", "Detect", "YOLOv8"]


def make_divisible(x: float, divisor: int = 8) -> int:
    """ultralytics' channel rounding: up to a multiple of `divisor`."""
    return math.ceil(x / divisor) * divisor


class Conv(nn.Module):
    """ultralytics' Conv: Conv2d (no bias, autopad) -> BN (eps 1e-3, momentum 0.03) -> SiLU."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, residual when asked and the shapes match."""

    def __init__(self, cin: int, cout: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(cin, cout, 3)
        self.cv2 = Conv(cout, cout, 3)
        self.add = shortcut and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with 2 convs: split cv1's output, chain n Bottlenecks, concat all, cv2."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained 5x5 max-pools, concat, 1x1."""

    def __init__(self, cin: int, cout: int, k: int = 5) -> None:
        super().__init__()
        hidden = cin // 2
        self.cv1 = Conv(cin, hidden, 1)
        self.cv2 = Conv(hidden * 4, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss integral: a fixed 1x1 Conv2d (weights 0..reg_max-1) over a softmax."""

    def __init__(self, c1: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


class Detect(nn.Module):
    """YOLOv8's decoupled head: per level a box branch (4 x reg_max) and a class branch; DFL decoding."""

    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...] = (8, 16, 32)) -> None:
        super().__init__()
        self.nc, self.reg_max = nc, 16
        c2, c3 = max(16, ch[0] // 4, self.reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch
        )
        self.dfl = DFL(self.reg_max)
        self.strides = strides

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        n, no = feats[0].shape[0], self.nc + 4 * self.reg_max
        outs = [torch.cat((b(x), c(x)), 1) for x, b, c in zip(feats, self.cv2, self.cv3, strict=True)]
        points, strides = [], []
        for x, s in zip(outs, self.strides, strict=True):  # ultralytics' make_anchors(offset=0.5)
            h, w = x.shape[2:]
            sy, sx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
            points.append(torch.stack((sx, sy), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), float(s)))
        anchors, stride = torch.cat(points).T.unsqueeze(0), torch.cat(strides).T
        box, cls = torch.cat([x.view(n, no, -1) for x in outs], 2).split((4 * self.reg_max, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)  # dist2bbox(xywh=True)
        x1y1, x2y2 = anchors - lt, anchors + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * stride
        return torch.cat((dbox, cls.sigmoid()), 1)


class YOLOv8(nn.Module):
    """yolov8.yaml's graph; `model.N` names as ultralytics (model.22 is Detect)."""

    def __init__(self, num_classes: int = 80, depth: float = 0.33, width: float = 0.25) -> None:
        super().__init__()

        def c(ch: int) -> int:
            return make_divisible(min(ch, 1024) * width)

        def d(n: int) -> int:
            return max(round(n * depth), 1)

        # The Identity slots stand for ultralytics' Concat layers (no weights), so indices match model.N.
        # fmt: off
        self.model = nn.ModuleList([
            Conv(3, c(64), 3, 2), Conv(c(64), c(128), 3, 2), C2f(c(128), c(128), d(3), True),  # 0-2
            Conv(c(128), c(256), 3, 2), C2f(c(256), c(256), d(6), True),  # 3-4 (P3/8)
            Conv(c(256), c(512), 3, 2), C2f(c(512), c(512), d(6), True),  # 5-6 (P4/16)
            Conv(c(512), c(1024), 3, 2), C2f(c(1024), c(1024), d(3), True), SPPF(c(1024), c(1024)),  # 7-9
            nn.Upsample(None, 2, "nearest"), nn.Identity(), C2f(c(1024) + c(512), c(512), d(3)),  # 10-12
            nn.Upsample(None, 2, "nearest"), nn.Identity(), C2f(c(512) + c(256), c(256), d(3)),  # 13-15
            Conv(c(256), c(256), 3, 2), nn.Identity(), C2f(c(256) + c(512), c(512), d(3)),  # 16-18
            Conv(c(512), c(512), 3, 2), nn.Identity(), C2f(c(512) + c(1024), c(1024), d(3)),  # 19-21
            Detect(num_classes, (c(256), c(512), c(1024))),  # 22
        ])
        # fmt: on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        p3 = m[4](m[3](m[2](m[1](m[0](x)))))
        p4 = m[6](m[5](p3))
        p5 = m[9](m[8](m[7](p4)))
        h12 = m[12](torch.cat((m[10](p5), p4), 1))
        h15 = m[15](torch.cat((m[13](h12), p3), 1))
        h18 = m[18](torch.cat((m[16](h15), h12), 1))
        h21 = m[21](torch.cat((m[19](h18), p5), 1))
        return m[22]([h15, h18, h21])
