"""The real trained models `output_sensitivity.py` measures, each with calibration data, test data that
neither calibration nor the policy sees, and (where it has one) its task metric.

| name | model | calibration | test | metric |
|---|---|---|---|---|
| digits | the demo's digits CNN (7 layers) | 500 calibration digits | 1,000 test digits | top-1 |
| rnet, onet | MTCNN RNet / ONet | 96 face / non-face crops | the other 104 | face/non-face agreement |
| crepe | CREPE-tiny (pitch) | 96 tones (seed 0) | 96 tones (seed 1) | raw pitch accuracy |
| centerpoint | the demo's CenterPoint-shaped detector | 8 real LiDAR frames | its held-out frames | heat-map acc. |
| mobilenet | MobileNetV2 x0.5 trained on MNIST (53 layers) | 500 digits | 1,000 test digits | top-1 |
| yolo | YOLOv8n (nudenet's weights via onnx2torch, 64 layers) | 32 real photos (seed 1) | 32 others (seed 7) | — |
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

__all__ = ["MODELS", "Case"]


@dataclass
class Case:
    name: str
    model: nn.Module
    calib: list[Any]
    test: list[Any]
    metric: Callable[[nn.Module], float] | None = None
    metric_name: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def digits() -> Case:
    from sensitivity.demo.digits import accuracy, train_digits_cnn
    from sensitivity.demo.mnist import load_split

    split = load_split()
    model = train_digits_cnn().eval()
    test_x, test_y = split.test
    return Case("digits", model, list(split.calib[0].split(64)), list(test_x.split(250)),
                lambda m: accuracy(m, test_x, test_y), "top-1")  # fmt: skip


def _faces(load: Callable[[], nn.Module], inputs: Callable[[int], torch.Tensor], name: str) -> Case:
    model = load().eval()
    x = inputs(200)
    calib, test = x[:96], x[96:]
    with torch.no_grad():
        ref = model(test)[-1].argmax(1) if isinstance(model(test), tuple) else model(test).argmax(1)

    def agreement(m: nn.Module) -> float:
        with torch.no_grad():
            out = m(test)
            out = out[-1] if isinstance(out, tuple) else out
            return float((out.argmax(1) == ref).float().mean())

    return Case(
        name, model, list(calib.split(16)), list(test.split(52)), agreement, "face/non-face agreement"
    )


def rnet() -> Case:
    from sensitivity.demo.pretrained import load_rnet, rnet_inputs

    return _faces(load_rnet, rnet_inputs, "rnet")


def onet() -> Case:
    from sensitivity.demo.pretrained import load_onet, onet_inputs

    return _faces(load_onet, onet_inputs, "onet")


def crepe() -> Case:
    from sensitivity.demo.pretrained import crepe_bin_to_frequency, load_crepe_tiny, tones

    model = load_crepe_tiny().eval()
    calib, _ = tones(96, seed=0)
    test, freqs = tones(96, seed=1)

    def rpa(m: nn.Module) -> float:
        with torch.no_grad():
            est = crepe_bin_to_frequency(m(test).argmax(1))
        cents = 1200 * torch.log2(est / freqs).abs()
        return float((cents <= 50).float().mean())

    return Case("crepe", model, list(calib.split(16)), list(test.split(48)), rpa, "raw pitch accuracy")


def centerpoint() -> Case:
    from sensitivity.demo.centerpoint import make_batch
    from sensitivity.demo.centerpoint_train import (
        evaluate_proxy,
        heldout_frames,
        lidar_batches,
        train_centerpoint,
    )
    from sensitivity.integrations import activate

    model = activate(train_centerpoint()).eval()
    test = [make_batch([pts]) for pts, _ in heldout_frames()]

    def hm(m: nn.Module) -> float:
        scores = evaluate_proxy(m)
        keys = [k for k in scores if k.startswith("accuracy.")]
        return sum(scores[k] for k in keys) / len(keys)

    return Case(
        "centerpoint", model, lidar_batches(8), test, hm, "heat-map accuracy", {"outputs": ("pred_dicts",)}
    )


def mobilenet() -> Case:
    from trained_mobilenet import load_trained_mobilenet

    model, calib, held, eval_fn = load_trained_mobilenet()
    return Case("mobilenet", model.eval(), calib, held, lambda m: eval_fn(m)["top1"], "top-1")


def yolo() -> Case:
    from tests.real_models import YoloNamedOutputs, load_yolov8n, real_photos

    model = YoloNamedOutputs(load_yolov8n()).eval()
    calib = list(real_photos(32, 320, seed=1).split(4))
    test = list(real_photos(32, 320, seed=7).split(4))
    return Case("yolo", model, calib, test)


MODELS: dict[str, Callable[[], Case]] = {
    "digits": digits,
    "rnet": rnet,
    "onet": onet,
    "crepe": crepe,
    "centerpoint": centerpoint,
    "mobilenet": mobilenet,
    "yolo": yolo,
}
