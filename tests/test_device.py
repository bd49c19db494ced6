"""Device handling: --device is validated in one line; on CUDA (lent GPU machines) a scan gives the CPU
scan's decisions. GPU tests are marked `gpu` and skipped where no CUDA device exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sensitivity import ScanOptions, scan
from sensitivity.cli import main
from tests.models import FoldableOutliers, OutlierChannelsNet

MODELS = str(Path(__file__).with_name("models.py"))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _batches(n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, 12, 12, generator=g) for _ in range(n)]


@pytest.mark.parametrize("device", ["tpu", "cuda:99", "nonsense"])
def test_bad_or_missing_devices_are_one_line(tmp_path: Path, capsys, device: str) -> None:
    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    torch.save(FoldableOutliers().state_dict(), tmp_path / "m.pth")
    torch.save(torch.randn(16, 3, 12, 12), tmp_path / "c.pt")
    args = [
        "scan",
        str(tmp_path / "m.pth"),
        "--arch",
        f"{MODELS}:FoldableOutliers",
        "--calib",
        str(tmp_path / "c.pt"),
    ]
    assert main([*args, "--device", device, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--device" in err and len(err.splitlines()) == 1


@pytest.mark.gpu
@needs_cuda
def test_cuda_scan_matches_cpu_decisions() -> None:
    cpu = scan(OutlierChannelsNet(), _batches())
    gpu = scan(OutlierChannelsNet(), _batches(), ScanOptions(device="cuda"))
    assert list(gpu.table["decision"]) == list(cpu.table["decision"])
    # cuDNN / cuBLAS sum in other orders (and may use TF32 off by default for conv in fp32): errors agree
    # to a few percent of their size, not bit for bit
    for col in ("iso_naive_rel_l1", "cum_naive_rel_l1", "iso_sq_rel_l1"):
        torch.testing.assert_close(
            torch.tensor(gpu.table[col].to_numpy()),
            torch.tensor(cpu.table[col].to_numpy()),
            rtol=0.05,
            atol=1e-4,
        )
    q = gpu.quantized_model("policy")
    assert next(q.parameters()).is_cuda
