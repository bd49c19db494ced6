"""Tiny models for tests, some with planted faults (outlier input channels, non-finite decodes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyConvNet(nn.Module):
    """Conv-BN-ReLU blocks, a residual add, a depthwise conv, global pool and a Linear head."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.bn1(self.conv1(x)) + x)
        x = F.relu(self.pw(F.relu(self.dw(x))))
        return self.fc(x.mean(dim=(2, 3)))


class PlantedOutlierNet(nn.Module):
    """`mid`'s input has one channel amplified 1e4x (its weights compensate): a per-tensor killer.

    Every other layer sees ordinary activations, so a scan must exclude exactly `mid`.
    """

    def __init__(self, width: int = 16, outlier_channel: int = 3, gain: float = 1e4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.post = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 5)
        g = torch.ones(width)
        g[outlier_channel] = gain
        self.register_buffer("gain", g.view(1, -1, 1, 1))
        with torch.no_grad():
            self.mid.weight[:, outlier_channel] /= gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x)) * self.gain
        x = F.relu(self.mid(x))
        x = F.relu(self.post(x))
        return self.head(x.mean(dim=(2, 3)))


def build_tiny() -> nn.Module:
    return TinyConvNet()


def build_planted() -> nn.Module:
    return PlantedOutlierNet()


class OutlierChannelsNet(nn.Module):
    """The research notes' 50x inputs: 5% of `mid`'s and `fc1`'s input channels are 50x larger.

    `mid`'s weights are not compensated (the outliers dominate its output too); `fc1`'s are (as in
    transformer-style outliers that the next weights scale back). Every other layer sees ordinary
    activations. SmoothQuant should be assigned to `mid` and `fc1` only."""

    def __init__(self, width: int = 40, gain: float = 50.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():  # weights depend on `seed` only, not on the global RNG
            torch.manual_seed(seed)
            self.stem = nn.Conv2d(3, width, 3, padding=1)
            self.mid = nn.Conv2d(width, width, 3, padding=1)
            self.post = nn.Conv2d(width, width, 3, padding=1)
            self.fc1 = nn.Linear(width, width)
            self.fc2 = nn.Linear(width, 10)
        n_out = max(1, round(0.05 * width))
        idx = torch.randperm(width, generator=g)[:n_out]
        gain_vec = torch.ones(width)
        gain_vec[idx] = gain
        self.register_buffer("gain_conv", gain_vec.view(1, -1, 1, 1))
        self.register_buffer("gain_fc", gain_vec.clone())
        self.outlier_channels = sorted(idx.tolist())
        with torch.no_grad():
            self.fc1.weight[:, idx] /= gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x)) * self.gain_conv
        x = F.relu(self.mid(x))
        x = F.relu(self.post(x))
        h = x.mean(dim=(2, 3)) * self.gain_fc
        return self.fc2(F.relu(self.fc1(h)))


class FoldableOutliers(nn.Module):
    """`b`'s input comes from `a` through ReLU only, and 2 of `a`'s 40 output channels are 50x larger
    (their weight rows scaled): SmoothQuant on `b` is chosen and its 1/s folds exactly into `a`."""

    def __init__(self, width: int = 40, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.a = nn.Conv2d(3, width, 3, padding=1)
            self.b = nn.Conv2d(width, width, 3, padding=1)
            self.c = nn.Conv2d(width, 8, 1)
        with torch.no_grad():
            self.a.weight[:2] *= 50.0
            self.a.bias[:2] *= 50.0
            self.b.weight[:, :2] /= 50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


class SlowNet(nn.Module):
    """A tiny conv net whose every forward sleeps `delay` seconds: long enough to interrupt mid-scan."""

    def __init__(self, delay: float = 0.4) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 4, 1)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.delay)
        return self.b(F.relu(self.a(x)))


class Decode(nn.Module):
    """CenterPoint-style decode of a `dim` head: exp of the regression output."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x * self.gain)


def plant_exp_fault_(stem: nn.Conv2d, dim: nn.Conv2d, bias: float) -> torch.Tensor:
    """Set `stem` (3 -> 8) and `dim` (8 -> 1) so that `dim`'s input has 7 channels at 1 and one at 1e5
    (multiply by the returned gain); `dim`'s weight compensates, so FP dim = bias - 6. Per-tensor input
    quantization (amax 1e5) zeroes the ordinary channels and the tiny weight: quantized dim = bias."""
    gain = torch.ones(1, 8, 1, 1)
    gain[:, 1] = 1e5
    with torch.no_grad():
        stem.weight.zero_()
        stem.bias.fill_(1.0)
        dim.weight.fill_(-1.0)
        dim.weight[:, 1] = 1e-5
        dim.bias.fill_(bias)
    return gain


def planted_confidence(model: nn.Module) -> dict[str, float]:
    """An `--eval` metric for CLI tests: the model's mean top softmax probability on fixed inputs."""
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return {"confidence": float(model(x).softmax(1).max(1).values.mean())}
