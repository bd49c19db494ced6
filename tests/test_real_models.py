"""The real detector and photos of tests/real_models.py: conversion, outputs, images, ONNX parity."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from sensitivity import ScanOptions, apply_policy, scan
from sensitivity.export import PARITY_RTOL, export_onnx, verify_onnx
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


def _drop_input_qdq(path: Path, layer: str) -> None:
    """Plant a real mismatch: `layer`'s Conv reads the tensor its input Q/DQ would have quantized."""
    model = onnx.load(str(path))
    nodes = {o: n for n in model.graph.node for o in n.output}
    conv = next(n for n in model.graph.node if n.name == f"/{layer}/Conv")
    conv.input[0] = nodes[nodes[conv.input[0]].input[0]].input[0]
    onnx.save(model, str(path))


@needs_yolo
@pytest.mark.slow
def test_yolov8n_onnx_parity_verdict(tmp_path: Path) -> None:
    """Issue item 19: end to end, ORT (Q/DQ as written) and the torch fake-quant YOLOv8n differ by
    several pixels, because float summation order flips a code at a .5 tie and the flip cascades
    through 64 layers; layer by layer they agree, so the verdict is ok, and a planted mismatch is not."""
    pytest.importorskip("onnxruntime")
    model = load_yolov8n()
    photos = real_photos(8, YOLOV8N_INPUT[-1])
    result = scan(model, list(photos[:6].split(2)), ScanOptions(alphas=()))
    qmodel = apply_policy(model, result.policy, result.quant_state)
    path = export_onnx(qmodel, photos[:1], tmp_path / "yolo.onnx")
    check = verify_onnx(path, qmodel, [photos[6:]], local_check=True)
    local = check["local_check"]
    assert local["layers_located"] == local["layers"] == 64
    assert check["verdict"] == "ok", check["verdict_reason"]
    assert max(local["worst_layer_rel_diff"], local["worst_layer_input_rel_diff"]) <= PARITY_RTOL
    if check["output_rel_diff_qdq_reference"] > PARITY_RTOL:  # the cascade (seen on every CPU tried)
        flip = local["first_flipped_code"]
        assert flip is not None and flip["tie_distance_steps"] < 1e-3 and flip["input_diff_steps"] < 1e-3
    _drop_input_qdq(path, "model/6/m/0/cv1/conv/Conv")
    check = verify_onnx(path, qmodel, [photos[6:]])
    assert check["verdict"] == "mismatch"
    assert check["verdict_reason"].startswith("layer model/6/m/0/cv1/conv/Conv computes otherwise")


@needs_yolo
def test_yolov8n_outputs_split_into_boxes_and_scores_through_the_cli(tmp_path: Path, capsys) -> None:
    """One output tensor mixes pixels and probabilities: `--outputs pkg:fn` names them, and each is measured
    apart (the scores' error is far larger than the pooled figure suggests)."""
    import json

    from sensitivity.cli import main

    here = Path(__file__).resolve().parent / "real_models.py"
    torch.save(load_yolov8n().state_dict(), tmp_path / "yolov8n.pth")
    argv = ["scan", str(tmp_path / "yolov8n.pth"), "--arch", f"{here}:load_yolov8n", "--calib",
            f"{here}:yolo_calibration", "--outputs", f"{here}:yolo_outputs", "--no-smoothquant",
            "--out", str(tmp_path / "rep"), "-q"]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "per model output" in text and "scores" in text and "boxes" in text
    rows = json.loads((tmp_path / "rep" / "scan.json").read_text())["output_comparison"]
    naive = {r["output"]: r for r in rows if r["config"] == "naive"}
    assert set(naive) == {"boxes", "scores"}
    assert (
        naive["scores"]["out_rel_l1"] > naive["boxes"]["out_rel_l1"]
    )  # hidden by the boxes' pixels when pooled
