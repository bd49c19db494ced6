"""Two gloo ranks under torchrun give the single-process report: maxima and counts exactly, sums to
float summation tolerance (layers.csv keeps 6 significant digits: compared to one unit in the 6th)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import torch

from sensitivity.cli import main
from tests.models import PlantedOutlierNet

MODELS = str(Path(__file__).with_name("models.py"))

EXACT = ("macs", "calls", "input_min", "input_absmax", "outlier_ratio", "iso_naive_max_abs", "cum_naive_max_abs",
         "iso_naive_nonfinite", "cum_naive_nonfinite", "cum_policy_nonfinite", "sq_alpha")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tmp_path / "planted.pth"
    torch.save(PlantedOutlierNet().state_dict(), model)
    calib = tmp_path / "calib.pt"
    torch.save(torch.randn(64, 3, 12, 12), calib)  # 8 batches: 6 fitting, 2 held out (1 per rank)
    args = ["scan", str(model), "--arch", f"{MODELS}:build_planted", "--calib", str(calib), "-q"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main([*args, "--out", str(single)]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "sensitivity", *args, "--out", str(multi)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert json.loads((multi / "scan.json").read_text())["calibration"]["ranks"] == 2
    a = pd.read_csv(single / "layers.csv").set_index("name")
    b = pd.read_csv(multi / "layers.csv").set_index("name")
    assert list(a.index) == list(b.index) and list(a.columns) == list(b.columns)
    for col in a.columns:
        if a[col].dtype == object or a[col].dtype == bool:
            assert a[col].fillna("").equals(b[col].fillna("")), col
        elif col in EXACT:
            pd.testing.assert_series_equal(a[col], b[col], check_exact=True, obj=col)
        else:
            pd.testing.assert_series_equal(a[col], b[col], rtol=2e-6, atol=0, obj=col)
    sa = torch.load(single / "quant_state.pt", weights_only=True)
    sb = torch.load(multi / "quant_state.pt", weights_only=True)
    for name, layer in sa["layers"].items():  # calibrated amax (max calibration) and factors: exact
        assert torch.equal(layer["input_amax"], sb["layers"][name]["input_amax"])
        assert torch.equal(layer["channel_absmax"], sb["layers"][name]["channel_absmax"])
        if layer["smooth_scale"] is not None:
            assert torch.equal(layer["smooth_scale"], sb["layers"][name]["smooth_scale"])
    assert (single / "exclude.yaml").read_text() == (multi / "exclude.yaml").read_text()
