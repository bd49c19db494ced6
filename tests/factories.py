"""Tiny model factories and calibration functions, referenced from tests as `<abs path>/factories.py:name`.

`tests` is not a package, so specs use the file form, which `resolve_callable` supports.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

FILE = __file__


class TinyCNN(nn.Module):
    """Conv-BN-ReLU, pooled, then a Linear head: the smallest model with every common layer kind."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_cnn(width: int = 8, num_classes: int = 10) -> TinyCNN:
    return TinyCNN(width, num_classes)


def two_input(width: int = 4) -> nn.Module:
    """A model called as `model(x, scale)`, for tuple batches."""

    class TwoInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(width, 2)

        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.fc(x * scale)

    return TwoInput()


def dict_input(width: int = 4) -> nn.Module:
    """A model called as `model(batch_dict)`, like OpenPCDet detectors."""

    class DictInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(width, 2)

        def forward(self, batch: dict) -> torch.Tensor:
            return self.fc(batch["points"]) * batch["batch_size"]

    return DictInput()


def broken(width: int = 8) -> nn.Module:
    raise ValueError(f"width {width} is not supported")


def not_a_module() -> dict:
    return {"weight": torch.zeros(2)}


def scripted() -> nn.Module:
    return torch.jit.script(nn.Linear(2, 2))


NOT_CALLABLE = 42


# ------------------------------------------------------------------------------------ calibration functions
def calib_batches() -> list:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(3)]


def calib_generator() -> Iterator[torch.Tensor]:
    """Endless: only safe with max_batches."""
    i = 0
    while True:
        yield torch.full((2, 4), float(i))
        i += 1


def calib_tensor() -> torch.Tensor:
    return torch.arange(10.0).reshape(5, 2)


def calib_dict() -> dict:
    return {"points": torch.zeros(3, 4), "batch_size": 1}


def calib_raises() -> list:
    raise RuntimeError("dataset root /data/kitti missing")


def calib_fails_midway() -> Iterator[torch.Tensor]:
    yield torch.zeros(2, 4)
    raise OSError("disk read error")


def calib_not_iterable() -> int:
    return 5


def calib_empty() -> list:
    return []
