"""Plain forwards of an OpenPCDet network over dumped batches: the baseline of `scan --pcdet-cfg`.

Builds the network as the adapter does (`sensitivity.integrations.pcdet.build_model`: config + checkpoint,
the forward stopping before box decoding and NMS), reads the batches `pcdet-dump` wrote, and runs one
forward per batch with one torch thread (what the scan does on spconv models: spconv's CPU kernels race
with several). Run it under ``/usr/bin/time -v`` beside ``sensitivity scan CKPT --pcdet-cfg CFG --calib DIR``
for the whole-process wall-time and peak-RSS ratios (benchmarks/README.md). Needs pcdet.

    python benchmarks/pcdet_forward.py CFG CKPT DUMP_DIR
    python benchmarks/pcdet_forward.py CFG CKPT --split val --batches 4   # frames from pcdet's dataset
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cfg")
    p.add_argument("ckpt")
    p.add_argument("calib", nargs="?", help="a pcdet-dump folder (else frames from the config's dataset)")
    p.add_argument("--split", default="val", help="without CALIB: the dataset split")
    p.add_argument("--batches", type=int, default=16, help="without CALIB: batches of one frame")
    args = p.parse_args()
    from sensitivity.data import load_calibration
    from sensitivity.integrations.pcdet import build_from_config, build_model, calibration_batches

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.calib is not None:
        model = build_model(args.cfg, args.ckpt)
        batches = load_calibration(args.calib, batch_size=1)
    else:  # as scan --pcdet-cfg without --calib: the frames evenly spaced over the split
        model, loader = build_from_config(args.cfg, args.ckpt, split=args.split, max_batches=args.batches)
        batches = calibration_batches(loader, args.batches)
    t1 = time.perf_counter()
    with torch.no_grad():
        for i, batch in enumerate(batches):
            t = time.perf_counter()
            out = model(batch)
            maps = [m for task in out["pred_dicts"] for m in task.values()]
            finite = all(bool(torch.isfinite(m).all()) for m in maps)
            print(
                f"batch {i}: {len(batch['voxels'])} voxels, forward {time.perf_counter() - t:.1f} s, finite {finite}"
            )
    print(f"build + load {t1 - t0:.1f} s, forwards {time.perf_counter() - t1:.1f} s ({len(batches)} batches)")


if __name__ == "__main__":
    main()
