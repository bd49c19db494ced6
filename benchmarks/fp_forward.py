"""The baseline process: load the model and calibration data as `sensitivity scan` does, run one FP pass.

Usage: python benchmarks/fp_forward.py MODEL.pth ARCH CALIB.pt BATCH_SIZE
"""

from __future__ import annotations

import sys

import torch

from sensitivity.data import load_calibration
from sensitivity.io.batches import run_model
from sensitivity.load import load_model


def main() -> None:
    path, arch, calib, batch_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = load_model(path, arch=arch).eval()
    batches = load_calibration(calib, batch_size=batch_size)
    with torch.no_grad():
        for batch in batches:
            run_model(model, batch)


if __name__ == "__main__":
    main()
