"""`pcdet-dump`: calibration batch_dicts written as plain .pt files, readable without OpenPCDet."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch import Tensor

from sensitivity.errors import CalibrationDataError
from sensitivity.integrations.pcdet.availability import require_pcdet
from sensitivity.integrations.pcdet.batches import batch_to_torch, read_frames
from sensitivity.integrations.pcdet.config import build_dataset, load_config, make_loader

log = logging.getLogger("sensitivity.integrations.pcdet")


_DROP = object()


def _plain(value: Any) -> Any:
    """`value` as what `torch.load(weights_only=True)` reads back (tensors, numbers, strings, None, lists
    and str-keyed dicts of them), or _DROP (calibration objects and the like)."""
    if isinstance(value, Tensor) or value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":
            return torch.from_numpy(np.ascontiguousarray(value))
        return _plain(value.tolist()) if value.dtype.kind in "USO" else _DROP
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        plain = {k: _plain(v) for k, v in value.items()}
        return _DROP if any(v is _DROP for v in plain.values()) else plain
    return _DROP


def dump_batches(
    cfg_path: str | os.PathLike[str],
    split: str = "val",
    n: int = 16,
    out_dir: str | os.PathLike[str] = "pcdet-calib",
    batch_size: int = 1,
    *,
    workers: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write `n` calibration batch_dicts of `split` (frames evenly spaced over it) to `out_dir`, one
    ``batch_NNNNN.pt`` per batch holding ``[batch_dict]`` as `batch_to_torch` makes it, with only values
    that `torch.load(weights_only=True)` reads (``frame_id`` becomes a list of strings; calibration objects
    and other non-plain metadata are dropped), and ``pcdet_dump.json`` (config, split, frame ids, dropped
    keys). The folder is written atomically (`--overwrite` replaces an existing one); `--calib out_dir`
    then reads the batches in order, without OpenPCDet's dataset code. Returns the batch files' paths."""
    from sensitivity.files import atomic_dir, check_output_dir, torch_save_file

    pcdet = require_pcdet()
    if n < 1:
        raise CalibrationDataError(f"--batches must be a positive integer, got {n}")
    out = Path(out_dir)
    check_output_dir(out, overwrite, inputs=[cfg_path])
    config, root = load_config(pcdet, cfg_path)
    cfg_name = Path(cfg_path).name
    dataset = build_dataset(pcdet, config, root, split, cfg_name)
    loader = make_loader(dataset, n * batch_size, batch_size, workers)
    names, frame_ids, dropped = [], [], set()
    with atomic_dir(out, overwrite, inputs=[cfg_path], kind="pcdet-dump") as tmp:
        for i, batch in enumerate(read_frames(loader, n)):
            kept = {}
            for key, value in batch_to_torch(batch).items():
                plain = _plain(value)
                if plain is _DROP:
                    dropped.add(key)
                else:
                    kept[key] = plain
            ids = kept.get("frame_id")
            frame_ids.extend(ids if isinstance(ids, list) else [ids])
            name = f"batch_{i:05d}.pt"
            torch_save_file([kept], tmp / name)
            names.append(name)
        if not names:
            raise CalibrationDataError(f"the {split} split of {cfg_name}'s dataset gave no batches")
        manifest = {
            "config": str(Path(cfg_path).resolve()),
            "split": split,
            "batch_size": batch_size,
            "batches": len(names),
            "frame_ids": [str(f) for f in frame_ids],
            "dropped_keys": sorted(dropped),
            "files": names,
        }
        (tmp / "pcdet_dump.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if dropped:
        log.info("left out of the dumped batches (not plain data): %s", ", ".join(sorted(dropped)))
    return [out / name for name in names]
