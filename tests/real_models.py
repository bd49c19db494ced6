"""A real pretrained detector and real photos for tests and benchmarks, read offline from installed wheels.

- **YOLOv8n**: the `nudenet` wheel ships Ultralytics' YOLOv8n detector (18 classes, trained at 320x320,
  exported by torch 2.3 at opset 17) as `nudenet/320n.onnx`; `load_yolov8n()` converts it to a torch
  module with `onnx2torch` (a `torch.fx.GraphModule` of plain `nn.Conv2d` / `nn.Sigmoid` / `nn.MaxPool2d`
  and onnx2torch's op modules, named after the ONNX nodes: `model/0/conv/Conv`, ...). Input: RGB float
  in [0, 1], [N, 3, 320, 320]. Output: one tensor [N, 4 + 18, 2100] (`yolo_outputs` splits it).
- **Photos**: scikit-image's colour sample photos and scikit-learn's two, as random crops (`real_photos`).

Not a test file: tests import it as `from tests.real_models import ...`; benchmarks put `tests/` on
`sys.path`. Both wheels are optional: `yolov8n_onnx_path()` is None without nudenet, so tests can skip.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "YOLOV8N_CLASSES",
    "YOLOV8N_INPUT",
    "YoloNamedOutputs",
    "load_yolov8n",
    "real_photos",
    "yolo_outputs",
    "yolov8n_onnx_path",
]

#: what the converted YOLOv8n takes: [N, *YOLOV8N_INPUT], RGB float in [0, 1]
YOLOV8N_INPUT = (3, 320, 320)
#: its number of classes (the output has 4 box rows, then one score row per class)
YOLOV8N_CLASSES = 18


def yolov8n_onnx_path() -> Path | None:
    """`320n.onnx` inside the installed nudenet package, or None when nudenet is not installed."""
    spec = importlib.util.find_spec("nudenet")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root, "320n.onnx")
        if path.is_file():
            return path
    return None


def _torchvision_stub() -> dict[str, types.ModuleType]:
    """Stand-ins for the only torchvision names onnx2torch imports (its NonMaxSuppression and RoiAlign
    converters, both at import time). YOLOv8n has neither op, so they are never called."""

    def missing(*_args: object, **_kwargs: object) -> None:
        raise RuntimeError("this ONNX op needs torchvision, which is not installed beside this torch")

    tv = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = ops.box_convert = ops.roi_align = missing  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    return {"torchvision": tv, "torchvision.ops": ops}


def _import_onnx2torch() -> types.ModuleType:
    """`import onnx2torch` without torchvision (PyPI's torchvision does not import beside torch 2.13).

    The stand-ins live in sys.modules only while onnx2torch imports, so nothing else is led to believe
    torchvision is installed."""
    if "onnx2torch" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        import onnx2torch

        return onnx2torch
    stubs = _torchvision_stub()
    sys.modules.update(stubs)
    try:
        import onnx2torch
    finally:
        for name in stubs:
            sys.modules.pop(name, None)
    return onnx2torch


@lru_cache(maxsize=1)
def _converted_yolov8n() -> nn.Module:
    path = yolov8n_onnx_path()
    if path is None:
        raise RuntimeError("YOLOv8n needs the nudenet wheel (scripts/bootstrap.sh installs it)")
    import onnx

    graph = onnx.load(str(path))
    needs_torchvision = {n.op_type for n in graph.graph.node} & {"NonMaxSuppression", "RoiAlign"}
    assert not needs_torchvision, (
        f"the detector graph now has {needs_torchvision}: onnx2torch needs torchvision"
    )
    model = _import_onnx2torch().convert(graph).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_yolov8n() -> nn.Module:
    """The pretrained YOLOv8n as an eval-mode torch module: a fresh copy of one in-process conversion
    (~1.5 s once), so callers may modify theirs."""
    return copy.deepcopy(_converted_yolov8n())


def yolo_outputs(output: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split YOLOv8's single output [N, 4 + C, A] into `boxes` [N, 4, A] (centre x, centre y, width,
    height in input pixels, 0..320) and `scores` [N, C, A] (per-class sigmoid probabilities, 0..1): one
    tensor mixes both units, so an error measured on it is dominated by the boxes."""
    if output.dim() != 3 or output.shape[1] <= 4:
        raise ValueError(f"expected a YOLOv8 output [N, 4 + C, A], got {tuple(output.shape)}")
    return {"boxes": output[:, :4], "scores": output[:, 4:]}


class YoloNamedOutputs(nn.Module):
    """`model` returning `yolo_outputs(model(x))`: a scan then reports boxes and scores separately.
    The layer names gain the prefix `yolo.`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.yolo = model
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return yolo_outputs(self.yolo(x))


@lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    """The colour sample photos of scikit-image (astronaut, coffee, chelsea, rocket) and scikit-learn
    (china, flower) as float [3, H, W] in [0, 1]; all are read from files inside the wheels."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    arrays += list(load_sample_images().images)
    return tuple(torch.from_numpy(np.array(a[..., :3])).permute(2, 0, 1).float() / 255.0 for a in arrays)


def real_photos(n: int, size: int = 320, seed: int = 0) -> torch.Tensor:
    """`n` distinct real photos, float [n, 3, size, size] in [0, 1]: image i is a random square crop
    (side 40-100 % of the photo's shorter side) of sample photo i mod 6, flipped left-right half the time,
    resized (antialiased bilinear). The same `seed` gives the same images."""
    photos = _photos()
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[1:]
        side = int(min(h, w) * (0.4 + 0.6 * torch.rand((), generator=gen).item()))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        left = int(torch.randint(0, w - side + 1, (), generator=gen))
        crop = photo[:, top : top + side, left : left + side]
        if torch.rand((), generator=gen).item() < 0.5:
            crop = crop.flip(-1)
        resized = F.interpolate(
            crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out[i] = resized[0].clamp_(0.0, 1.0)
    return out


def yolo_calibration() -> list[torch.Tensor]:
    """4 batches of 2 real photos at YOLOv8n's input size: `--calib tests/real_models.py:yolo_calibration`."""
    return list(real_photos(8, YOLOV8N_INPUT[-1], seed=1).split(2))
