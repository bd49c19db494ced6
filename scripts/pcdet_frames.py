#!/usr/bin/env python3
"""Set up real LiDAR frames for OpenPCDet's own NuScenesDataset, and a random-weights checkpoint.

No nuScenes data and no trained CenterPoint exist on the project's machines, so `scan --pcdet-cfg`,
`pcdet-dump` and `apply --pcdet-cfg` are run against the real OpenPCDet network on frames written here:

- real points: the laspy tile and PCL's lamppost of ``tests/data/pointclouds`` (read with
  `sensitivity.demo.pointclouds`), placed around a virtual sensor (several copies of the 18 x 12 m tile,
  each turned and moved, at most 54 m away) and written in nuScenes' on-disk layout: float32
  ``[x, y, z, intensity 0-255, ring]`` ``.pcd.bin`` files under ``<version>/samples/LIDAR_TOP`` and 9
  sweeps per frame under ``<version>/sweeps/LIDAR_TOP`` (a random 20 % of the scene seen from a sensor
  moving at 5 m/s, with its 4 x 4 sweep-to-frame transform and time lag, as nuScenes' infos hold them);
- the infos: ``<version>/<INFO_PATH>.pkl`` per split (the names the config's ``INFO_PATH`` gives), lists of
  dicts with ``lidar_path``, ``token``, ``sweeps``, ``timestamp`` - what `NuScenesDataset.__getitem__` reads
  in evaluation mode (no ``gt_boxes``: none are needed to calibrate);
- ``<config stem>.yaml`` beside them: the model config with ``DATA_CONFIG._BASE_CONFIG_`` made absolute and
  ``DATA_PATH`` pointing here, usable from any folder;
- ``centerpoint_random.pth``: the config's network with its random initial weights (``torch.manual_seed``),
  saved as OpenPCDet saves checkpoints (``{'model_state': state_dict, 'epoch': 0}``); needs pcdet.

``--link`` also makes ``<OpenPCDet>/data/nuscenes`` a symlink to the output folder, so the config's own
``DATA_PATH`` (``../data/nuscenes`` from ``tools/``) finds the frames and the README's commands run as
written. Run with the Python that has pcdet (for the checkpoint; ``--no-checkpoint`` writes only frames)::

    python scripts/pcdet_frames.py --openpcdet /path/to/OpenPCDet --out /tmp/pcdet-frames [--link]

The frames are deterministic for a given ``--seed``; OpenPCDet's evaluation pipeline itself shuffles the
points of each frame (``shuffle_points`` with ``SHUFFLE_ENABLED.test``) and draws the sweeps' order at
random, so two reads of a frame voxelize alike only up to point order: for identical batches across runs,
`pcdet-dump` them once.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CFG = "tools/cfgs/nuscenes_models/cbgs_voxel0075_res3d_centerpoint.yaml"
SENSOR_HEIGHT = 1.8  # metres above ground: nuScenes' LIDAR_TOP frame has its origin at the sensor
SWEEPS = 9  # MAX_SWEEPS 10 in OpenPCDet's nuScenes configs: the frame + 9 sweeps drawn from its infos
SWEEP_DT = 0.05  # s between sweeps (20 Hz)
SPEED = 5.0  # m/s, along x


def _scene(rng: np.random.Generator, copies: int, lampposts: int, reach: float) -> np.ndarray:
    """Real points [N, 4] (x, y, z, intensity 0-255) around a sensor at the origin, in its frame."""
    sys.path.insert(0, str(ROOT))
    from sensitivity.demo.pointclouds import frame_points, load_aerial_tile, load_lamppost

    tile = load_aerial_tile()
    ex, ey = tile.extent
    parts = []
    for k in range(copies):
        yaw = float(rng.uniform(-math.pi, math.pi))
        pts, _ = frame_points(tile, yaw=yaw, center=(ex / 2, ey / 2))  # centred on the tile
        angle = 2 * math.pi * (k + float(rng.uniform(0.0, 1.0))) / max(copies, 1)
        radius = float(rng.uniform(4.0, reach))
        pts[:, 0] += radius * math.cos(angle)
        pts[:, 1] += radius * math.sin(angle)
        pts[:, 2] -= SENSOR_HEIGHT
        pts[:, 3] *= 255.0
        parts.append(pts)
    post = load_lamppost()
    post = post - np.array([post[:, 0].mean(), post[:, 1].mean(), 0.0], dtype=np.float32)
    for _ in range(lampposts):
        angle, radius = float(rng.uniform(-math.pi, math.pi)), float(rng.uniform(3.0, reach))
        shift = [radius * math.cos(angle), radius * math.sin(angle), -SENSOR_HEIGHT]
        xyz = post + np.array(shift, np.float32)
        parts.append(np.concatenate([xyz, np.full((len(xyz), 1), 40.0, np.float32)], axis=1))
    scene = np.concatenate(parts, axis=0).astype(np.float32)
    keep = (np.abs(scene[:, 0]) < 54.0) & (np.abs(scene[:, 1]) < 54.0)
    return scene[keep]


def _bin(points: np.ndarray) -> np.ndarray:
    """nuScenes' LIDAR_TOP record: x, y, z, intensity, ring index (0-31), float32."""
    elevation = np.arctan2(points[:, 2], np.hypot(points[:, 0], points[:, 1]) + 1e-6)
    ring = np.clip((elevation + 0.54) / 0.0227, 0, 31)  # 32 beams from -31 to +10 degrees
    return np.concatenate([points[:, :4], np.floor(ring)[:, None]], axis=1).astype(np.float32)


def _translation(dx: float) -> np.ndarray:
    m = np.eye(4)
    m[0, 3] = dx
    return m


def write_frames(
    root: Path, names: dict[str, list[str]], frames: dict[str, int], *, copies: int, lampposts: int,
    sweep_keep: float, seed: int,
) -> dict[str, int]:  # fmt: skip
    """Write the frames and the info .pkl of each split under `root` (DATA_PATH/VERSION); returns the point
    count of the first frame (frame + sweeps) per split."""
    samples, sweeps = root / "samples" / "LIDAR_TOP", root / "sweeps" / "LIDAR_TOP"
    samples.mkdir(parents=True, exist_ok=True)
    sweeps.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    points: dict[str, int] = {}
    for split, count in frames.items():
        infos: list[dict[str, Any]] = []
        for i in range(count):
            timestamp = 1_533_000_000_000_000 + i * 500_000 + (split == "train") * 10**9
            stem = f"sensitivity-{split}__LIDAR_TOP__{timestamp}"
            scene = _scene(rng, copies, lampposts, reach=45.0)
            frame = f"samples/LIDAR_TOP/{stem}.pcd.bin"
            _bin(scene).tofile(root / frame)
            total = len(scene)
            sweep_infos = []
            for j in range(1, SWEEPS + 1):
                moved = SPEED * SWEEP_DT * j  # the sensor was `moved` metres behind (along -x) then
                part = scene[rng.random(len(scene)) < sweep_keep].copy()
                part[:, 0] += moved  # seen from there
                part[:, :3] += rng.normal(0.0, 0.02, (len(part), 3)).astype(np.float32)  # range noise
                name = f"sweeps/LIDAR_TOP/{stem}__sweep{j}.pcd.bin"
                _bin(part).tofile(root / name)
                total += len(part)
                sweep_infos.append(
                    {"lidar_path": name, "transform_matrix": _translation(-moved), "time_lag": SWEEP_DT * j}
                )
            infos.append(
                {
                    "lidar_path": frame,
                    "token": f"{split}{i:04d}",
                    "sweeps": sweep_infos,
                    "timestamp": timestamp,
                }
            )
            points.setdefault(split, total)
        for info_name in names[split]:
            with open(root / info_name, "wb") as f:
                pickle.dump(infos, f)
    return points


def _pcdet_config(openpcdet: Path, cfg: Path) -> Any:
    """The merged config, read as OpenPCDet's tools/ scripts read it (from tools/)."""
    import copy

    from pcdet.config import cfg as global_cfg
    from pcdet.config import cfg_from_yaml_file

    before = os.getcwd()
    os.chdir(openpcdet / "tools")
    try:
        return cfg_from_yaml_file(str(cfg), copy.deepcopy(global_cfg))
    finally:
        os.chdir(before)


def write_checkpoint(config: Any, out: Path, seed: int) -> Path:
    """The network of `config` with its random initial weights, saved as OpenPCDet saves checkpoints."""
    import logging

    import torch
    from pcdet.datasets import DatasetTemplate
    from pcdet.models import build_network

    from sensitivity.integrations.pcdet import cuda_calls_stay_on_cpu

    dataset = DatasetTemplate(dataset_cfg=config.DATA_CONFIG, class_names=config.CLASS_NAMES, training=False,
                              root_path=out, logger=logging.getLogger("pcdet_frames"))  # fmt: skip
    torch.manual_seed(seed)
    with cuda_calls_stay_on_cpu():
        model = build_network(model_cfg=config.MODEL, num_class=len(config.CLASS_NAMES), dataset=dataset)
    path = out / "centerpoint_random.pth"
    torch.save({"model_state": model.state_dict(), "epoch": 0}, path)
    return path


def write_config(openpcdet: Path, cfg: Path, out: Path) -> Path:
    """The model config with absolute _BASE_CONFIG_ and DATA_PATH = `out`: runs from any folder."""
    import yaml

    raw = yaml.safe_load(cfg.read_text())
    data = raw["DATA_CONFIG"]
    base = Path(data["_BASE_CONFIG_"])
    data["_BASE_CONFIG_"] = str(base if base.is_absolute() else (openpcdet / "tools" / base).resolve())
    raw["DATA_CONFIG"] = {"_BASE_CONFIG_": data.pop("_BASE_CONFIG_"), "DATA_PATH": str(out), **data}
    path = out / cfg.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--openpcdet", type=Path, required=True, help="OpenPCDet source root (holds tools/)")
    p.add_argument("--cfg", default=DEFAULT_CFG, help="model config, relative to --openpcdet or absolute")
    p.add_argument("--out", type=Path, required=True, help="folder to write (DATA_PATH of the new config)")
    p.add_argument("--val", type=int, default=8, help="frames of the evaluation split")
    p.add_argument("--train", type=int, default=4, help="frames of the training split")
    p.add_argument("--copies", type=int, default=4, help="copies of the aerial tile per frame")
    p.add_argument("--lampposts", type=int, default=6, help="lamppost scans per frame")
    p.add_argument("--sweep-keep", type=float, default=0.2, help="fraction of the scene in each sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-checkpoint", action="store_true", help="frames only (pcdet not needed)")
    p.add_argument("--link", action="store_true", help="symlink <OpenPCDet>/data/nuscenes to --out")
    args = p.parse_args(argv)

    openpcdet = args.openpcdet.resolve()
    cfg = Path(args.cfg) if Path(args.cfg).is_absolute() else openpcdet / args.cfg
    out = args.out.resolve()
    import yaml

    base = yaml.safe_load(cfg.read_text())["DATA_CONFIG"]["_BASE_CONFIG_"]
    dataset_cfg = yaml.safe_load((openpcdet / "tools" / base).read_text())
    version = dataset_cfg.get("VERSION", "v1.0-trainval")
    info = dataset_cfg["INFO_PATH"]
    names = {"val": list(info["test"]), "train": list(info["train"])}
    points = write_frames(out / version, names, {"val": args.val, "train": args.train}, copies=args.copies,
                          lampposts=args.lampposts, sweep_keep=args.sweep_keep, seed=args.seed)  # fmt: skip
    config_path = write_config(openpcdet, cfg, out)
    print(f"wrote {args.val} val and {args.train} train frames to {out / version} "
          f"({points.get('val', 0)} points in the first val frame with its sweeps)")  # fmt: skip
    print(f"config: {config_path}")
    if not args.no_checkpoint:
        import torch  # noqa: F401  (before pcdet: its CUDA ops need torch's libraries loaded)

        ckpt = write_checkpoint(_pcdet_config(openpcdet, cfg), out, args.seed)
        print(f"checkpoint: {ckpt}")
    if args.link:
        link = openpcdet / "data" / "nuscenes"
        if link.is_symlink() and link.resolve() != out:
            link.unlink()
        if link.exists() and not link.is_symlink():
            print(f"{link} exists and is not a symlink: not replaced", file=sys.stderr)
            return 1
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(out, target_is_directory=True)
        print(f"linked {link} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
