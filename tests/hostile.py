"""Models, data sources and --eval / --outputs functions a hostile tester feeds the CLI (file:function specs).

Each is a sample of a class: the tests run several siblings of each.
"""

from __future__ import annotations

import math

import torch
from torch import nn

FILE = __file__


# ---------------------------------------------------------------------------------------------- models
class InPlaceInput(nn.Module):
    """Writes into its input before using it (x.mul_, slice assignment)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2.0)
        x[:, 0] = 0.5
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class InPlaceDict(nn.Module):
    """An OpenPCDet-like model: writes into the tensors of the batch dict it gets, and adds keys."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, batch: dict) -> torch.Tensor:
        batch["points"].add_(1.0)
        batch["features"] = self.fc(batch["points"])
        return batch["features"]


class MixedUnits(nn.Module):
    """One output tensor [N, 4 + C, A] of box coordinates in pixels and class scores in [0, 1], as YOLOv8's."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.box = nn.Conv2d(16, 4, 1)
        self.cls = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        boxes = self.box(h).flatten(2) * 300.0
        scores = torch.sigmoid(self.cls(h).flatten(2))
        return torch.cat([boxes, scores], dim=1)


class DictOut(nn.Module):
    """A detection-head-like model with dict (and nested) outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.hm = nn.Conv2d(8, 2, 1)
        self.reg = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> dict:
        h = torch.relu(self.conv(x))
        return {"hm": self.hm(h), "boxes": {"reg": self.reg(h), "ids": torch.zeros(1, dtype=torch.long)}}


class Unexportable(nn.Module):
    """A Linear, then an op torch's ONNX exporter has no symbolic for (singular values)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(self.fc(x).reshape(-1, 2, 4))


class ScriptedPart(nn.Module):
    """An eager conv followed by a TorchScript block holding convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = torch.jit.script(nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.stem(x))).mean(dim=(2, 3))


def in_place_input() -> nn.Module:
    return InPlaceInput()


def mixed_units() -> nn.Module:
    return MixedUnits()


def dict_out() -> nn.Module:
    return DictOut()


def unexportable() -> nn.Module:
    return Unexportable()


def scripted_part() -> nn.Module:
    return ScriptedPart()


# ------------------------------------------------------------------------------------------- --outputs
def split_boxes_scores(out: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"boxes": out[:, :4], "scores": out[:, 4:]}


def outputs_raise(out: torch.Tensor) -> dict[str, torch.Tensor]:
    raise KeyError("no such head")


def outputs_not_a_dict(out: torch.Tensor) -> int:
    return 3


# ---------------------------------------------------------------------------------------------- --eval
def eval_nan(model: nn.Module) -> dict[str, float]:
    return {"top1": math.nan}


def eval_inf(model: nn.Module) -> dict[str, float]:
    return {"top1": -math.inf}


_CALLS = {"n": 0}


def eval_nan_when_quantized(model: nn.Module) -> dict[str, float]:
    """FP first (a finite score), then NaN for every quantized configuration: a broken metric pipeline."""
    _CALLS["n"] += 1
    return {"top1": 0.9 if _CALLS["n"] == 1 else math.nan}


# ------------------------------------------------------------------------------------ calibration data
def _images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def calib_sparse() -> list:
    return [_images().to_sparse()]


def calib_meta() -> list:
    return [torch.empty(8, 3, 12, 12, device="meta")]


def calib_float8() -> list:
    return [_images().to(torch.float8_e4m3fn)]


def calib_nested() -> list:
    return [torch.nested.nested_tensor([torch.randn(3, 12, 12), torch.randn(3, 10, 12)])]


def calib_quantized() -> list:
    return [torch.quantize_per_tensor(_images(), 0.1, 0, torch.qint8)]


def calib_int64_one() -> torch.Tensor:
    return torch.randint(0, 255, (4, 3, 12, 12))


def calib_uint8_one() -> torch.Tensor:
    return torch.randint(0, 255, (4, 3, 12, 12), dtype=torch.uint8)


def calib_dict_for_tensor_model() -> list:
    return [{"x": _images(1)} for _ in range(4)]


def calib_tuple_with_none() -> list:
    return [(_images(1), None) for _ in range(4)]


def calib_images() -> list:
    return [_images(4) for _ in range(4)]


def calib_dicts() -> list:
    g = torch.Generator().manual_seed(1)
    return [{"points": torch.randn(16, 4, generator=g)} for _ in range(4)]


def calib_vectors() -> list:
    g = torch.Generator().manual_seed(2)
    return [torch.randn(4, 6, generator=g) for _ in range(4)]


_REF: dict[str, torch.Tensor] = {}


def eval_agreement(model: nn.Module) -> dict[str, float]:
    """Minus the relative L1 distance to the FP model's outputs on fixed inputs (0 for FP itself): an FP
    model (no quantized layers) sets the reference, as the scan evaluates FP first."""
    from sensitivity.quant.modules import QuantMixin

    x = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = model(x)
    if not any(isinstance(m, QuantMixin) for m in model.modules()):
        _REF["y"] = y
    ref = _REF["y"]
    return {"agree": -float((y - ref).abs().mean() / ref.abs().mean())}
