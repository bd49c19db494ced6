"""The real detector and photos of tests/real_models.py: conversion, outputs, images."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from tests.real_models import (
    YOLOV8N_CLASSES,
    YOLOV8N_INPUT,
    load_yolov8n,
    real_photos,
    yolo_outputs,
    yolov8n_onnx_path,
)

needs_yolo = pytest.mark.skipif(yolov8n_onnx_path() is None, reason="nudenet (YOLOv8n ONNX) not installed")


@needs_yolo
def test_yolov8n_converts_runs_and_matches_the_onnx_file() -> None:
    ort = pytest.importorskip("onnxruntime")
    model = load_yolov8n()
    assert "torchvision" not in sys.modules  # the import stand-ins are gone again
    assert not model.training
    assert sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) == 64
    x = real_photos(2, YOLOV8N_INPUT[-1])
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 4 + YOLOV8N_CLASSES, 2100) and torch.isfinite(y).all()
    sess = ort.InferenceSession(str(yolov8n_onnx_path()), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"images": x.numpy()})[0]
    assert np.abs(ref - y.numpy()).max() <= 1e-5 * np.abs(ref).max()  # float summation order only
    out = yolo_outputs(y)
    assert out["boxes"].shape == (2, 4, 2100) and out["scores"].shape == (2, YOLOV8N_CLASSES, 2100)
    assert out["scores"].min() >= 0 and out["scores"].max() <= 1
    assert out["boxes"].max() > 100  # pixels: the units the split keeps apart
    assert load_yolov8n() is not model  # each call gets its own copy of the cached conversion


def test_real_photos_are_distinct_repeatable_and_in_range() -> None:
    pytest.importorskip("skimage")
    a = real_photos(8, 64)
    assert a.shape == (8, 3, 64, 64) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(real_photos(8, 64), a, rtol=0, atol=0)
    assert not torch.equal(real_photos(8, 64, seed=1), a)
    flat = a.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(8) for j in range(i))
    assert a.std() > 0.1  # real content, not blank crops
