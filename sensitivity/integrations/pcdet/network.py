"""The OpenPCDet network from a config and a checkpoint: every weight must load."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.utils.data
from torch import Tensor, nn

from sensitivity.errors import ModelLoadError, SensitivityError
from sensitivity.errors import describe_exception as _exc
from sensitivity.integrations.pcdet.availability import (
    PcdetConfigError,
    cuda_calls_stay_on_cpu,
    require_pcdet,
)
from sensitivity.integrations.pcdet.config import build_dataset, load_config, make_loader, root_path
from sensitivity.integrations.pcdet.forward import PcdetForward

log = logging.getLogger("sensitivity.integrations.pcdet")


def _check_loaded(detector: nn.Module, disk: Mapping[str, Tensor], ckpt: Path, cfg_name: str) -> None:
    """Every weight of the network must come from the checkpoint (`load_params_from_file` only logs the
    keys it skips). Shapes are compared by size: it transposes spconv 1.x weights itself."""
    own = detector.state_dict()
    missing = [k for k in own if k not in disk]
    mismatched = [
        f"{k} file {list(disk[k].shape)} vs network {list(v.shape)}"
        for k, v in own.items()
        if k in disk and isinstance(v, Tensor) and disk[k].numel() != v.numel()
    ]
    parts = []
    if missing:
        shown = ", ".join(missing[:5]) + (f", … ({len(missing) - 5} more)" if len(missing) > 5 else "")
        parts.append(f"{len(missing)} of the network's {len(own)} weights are missing: {shown}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches: {', '.join(mismatched[:3])}")
    if parts:
        raise ModelLoadError(
            f"the checkpoint {ckpt.name} does not fit the network of {cfg_name}: " + "; ".join(parts)
        )


def _read_checkpoint(ckpt_path: str | os.PathLike[str], trust_pickle: bool) -> tuple[Path, dict[str, Tensor]]:
    """The checkpoint's weights, read with `weights_only=True` before OpenPCDet unpickles the file (and
    before its dataset is built: a wrong path fails at once)."""
    from sensitivity.load import load_state_dict

    ckpt = Path(ckpt_path).expanduser()
    return ckpt, load_state_dict(ckpt, trust_pickle=trust_pickle)


def _network(
    pcdet: ModuleType, config: Any, dataset: Any, ckpt: Path, disk: Mapping[str, Tensor], cfg_name: str
) -> PcdetForward:
    try:
        with cuda_calls_stay_on_cpu():
            detector = pcdet.models.build_network(
                model_cfg=config.MODEL, num_class=len(config.CLASS_NAMES), dataset=dataset
            )
    except SensitivityError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"OpenPCDet cannot build the network of {cfg_name}: {_exc(exc)}") from exc
    _check_loaded(detector, disk, ckpt, cfg_name)  # first: OpenPCDet's loader fails obscurely otherwise
    try:
        detector.load_params_from_file(filename=str(ckpt), logger=log, to_cpu=True)
    except Exception as exc:
        raise ModelLoadError(f"OpenPCDet cannot load the checkpoint {ckpt}: {_exc(exc)}") from exc
    return PcdetForward(detector)


def build_from_config(
    cfg_path: str | os.PathLike[str],
    ckpt_path: str | os.PathLike[str],
    split: str = "val",
    batch_size: int = 1,
    workers: int = 0,
    max_batches: int | None = None,
    *,
    trust_pickle: bool = False,
) -> tuple[PcdetForward, torch.utils.data.DataLoader]:
    """(the checkpoint's detector as a `PcdetForward` on CPU, a DataLoader of numpy batch_dicts of `split`).

    With `max_batches`, the loader covers `max_batches * batch_size` frames evenly spaced over the split;
    without, the whole split in order. Feed its batches through `calibration_batches` (or `batch_to_torch`).
    """
    pcdet = require_pcdet()
    config, root = load_config(pcdet, cfg_path)
    cfg_name = Path(cfg_path).name
    ckpt, disk = _read_checkpoint(ckpt_path, trust_pickle)
    dataset = build_dataset(pcdet, config, root, split, cfg_name)
    model = _network(pcdet, config, dataset, ckpt, disk, cfg_name)
    frames = None if max_batches is None else max_batches * batch_size
    return model, make_loader(dataset, frames, batch_size, workers)


def build_model(
    cfg_path: str | os.PathLike[str], ckpt_path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> PcdetForward:
    """The checkpoint's detector without its dataset (for batches dumped with `dump_batches`): the
    network is built on `pcdet.datasets.DatasetTemplate(DATA_CONFIG, CLASS_NAMES, training=False)`, which
    reads no data."""
    pcdet = require_pcdet()
    config, root = load_config(pcdet, cfg_path)
    cfg_name = Path(cfg_path).name
    ckpt, disk = _read_checkpoint(ckpt_path, trust_pickle)
    try:
        dataset = pcdet.datasets.DatasetTemplate(
            dataset_cfg=config.DATA_CONFIG,
            class_names=config.CLASS_NAMES,
            training=False,
            root_path=root_path(config.DATA_CONFIG, root),
            logger=log,
        )
    except Exception as exc:
        raise PcdetConfigError(f"OpenPCDet cannot read the DATA_CONFIG of {cfg_name}: {_exc(exc)}") from exc
    return _network(pcdet, config, dataset, ckpt, disk, cfg_name)
