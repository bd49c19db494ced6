"""Scan cost of the CenterPoint-shaped LiDAR model against its plain FP forward on the same real frames.

Trains (or loads from the cache) the model, voxelizes `--frames` real frames of the aerial tile with spconv,
saves both like a user would (state dict + a list of batch_dicts), then measures:

  whole process, alternately (medians of --repeats runs):
    A: `python -m sensitivity scan model.pth --arch sensitivity.demo.centerpoint:build_centerpoint
        --calib calib.pt --outputs pred_dicts` (default options)
    B: `benchmarks/fp_forward.py`: loads the same model and data the same way, one FP forward per batch
  in process: `scan()` against one FP forward over the batches (model and data already in memory).

Both sides run with the same number of torch threads (`--threads`, default 1: spconv's CPU kernels race
with several threads, so the scan runs sparse models single-threaded on CPU).

Usage: .venv/bin/python benchmarks/sparse_scan.py [--frames 8] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import compare  # noqa: E402

ARCH = "sensitivity.demo.centerpoint:build_centerpoint"


def in_process(
    model: torch.nn.Module, batches: list[dict], repeats: int
) -> tuple[float, float, dict[str, float]]:
    """(median scan seconds, median FP-forward seconds, median seconds per scan phase) with model and data
    in memory."""
    from sensitivity import ScanOptions, scan

    scans, fps, phases = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for batch in batches:
                model(batch)
        fps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        result = scan(model, batches, ScanOptions(outputs=("pred_dicts",)))
        scans.append(time.perf_counter() - t0)
        phases.append(result.timings)
    per_phase = {
        k.removesuffix("_s"): statistics.median(p[k] for p in phases) for k in phases[0] if k != "total_s"
    }
    return statistics.median(scans), statistics.median(fps), per_phase


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=8, help="calibration batches (one frame each)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the child processes start with this many threads
    torch.set_num_threads(args.threads)

    from sensitivity.demo.centerpoint_train import lidar_batches, train_centerpoint

    model = train_centerpoint()
    batches = lidar_batches(args.frames)
    voxels = sum(int(b["voxels"].shape[0]) for b in batches) / len(batches)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        torch.save(model.state_dict(), tmpd / "model.pth")
        torch.save(batches, tmpd / "calib.pt")
        py = sys.executable
        scan_cmd = [
            py, "-m", "sensitivity", "scan", str(tmpd / "model.pth"), "--arch", ARCH,
            "--calib", str(tmpd / "calib.pt"), "--outputs", "pred_dicts",
            "--out", str(tmpd / "report"), "--overwrite", "--quiet",
        ]  # fmt: skip
        fp_cmd = [py, str(HERE / "fp_forward.py"), str(tmpd / "model.pth"), ARCH, str(tmpd / "calib.pt"), "1"]
        res = compare({"scan": scan_cmd, "fp-forward": fp_cmd}, repeats=args.repeats)
        base_cmd = [py, str(HERE / "one_at_a_time.py"), str(tmpd / "model.pth"), ARCH, str(tmpd / "calib.pt"), "1",
                    "pred_dicts"]  # fmt: skip
        base = compare({"one-at-a-time": base_cmd}, repeats=1, warmup=0)["one-at-a-time"]
    a, b = res["scan"], res["fp-forward"]
    scan_s, fp_s, per_phase = in_process(model, batches, args.repeats)
    print(
        f"CenterPoint-shaped model, {args.frames} real frames (mean {voxels:.0f} voxels), batch 1, "
        f"torch threads {args.threads}, medians of {args.repeats} runs"
    )
    print("  whole process (start-up, loading, report writing included):")
    print(f"    scan        wall {a.wall:7.2f} s   peak RSS {a.rss:8.1f} MiB")
    print(f"    FP forward  wall {b.wall:7.2f} s   peak RSS {b.rss:8.1f} MiB")
    print(f"    ratio scan / FP forward: time {a.wall / b.wall:.2f}x   peak memory {a.rss / b.rss:.2f}x")
    print(f"    one-at-a-time baseline wall {base.wall:7.2f} s: the scan is {base.wall / a.wall:.1f}x faster")
    print("  in process (model and frames in memory):")
    print(f"    scan() {scan_s:.2f} s, FP forward over the frames {fp_s:.3f} s: ratio {scan_s / fp_s:.1f}x")
    print(
        "    per phase, in FP forwards over the frames: "
        + ", ".join(f"{k} {v / fp_s:.2f}x" for k, v in per_phase.items())
    )


if __name__ == "__main__":
    main()
