"""OpenPCDet configs (base configs, DATA_PATH, splits) and their datasets and loaders, from any working directory."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.utils.data

from sensitivity.errors import CalibrationDataError, SensitivityError
from sensitivity.errors import describe_exception as _exc
from sensitivity.integrations.pcdet.availability import PcdetConfigError
from sensitivity.policy.yamldoc import MAX_YAML_VALUES, expansion

log = logging.getLogger("sensitivity.integrations.pcdet")


def _bounded_yaml(path: Path) -> Any:
    """The parsed YAML file, refused when its anchors and aliases expand beyond `MAX_YAML_VALUES` (a
    "billion laughs" config would hang OpenPCDet's own reader, which has no bound)."""
    import yaml

    try:
        text = path.read_text()
        size = expansion(text)
        if size > MAX_YAML_VALUES:
            expands = "a recursive structure" if size == float("inf") else f"{int(size):,} values"
            raise PcdetConfigError(
                f"the OpenPCDet config {path} expands to {expands} through YAML anchors and aliases "
                f"(at most {MAX_YAML_VALUES:,})"
            )
        return yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PcdetConfigError(f"cannot read the OpenPCDet config {path}: {_exc(exc)}") from exc


def _base_configs(node: Any) -> list[str]:
    """Every `_BASE_CONFIG_` path in a parsed YAML (OpenPCDet allows one per mapping, at any depth)."""
    found: list[str] = []
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "_BASE_CONFIG_" and isinstance(value, str):
                found.append(value)
            else:
                found.extend(_base_configs(value))
    return found


def _config_root(path: Path, bases: list[str]) -> Path:
    """The folder OpenPCDet's relative paths resolve against (see the module docstring)."""
    relative = [b for b in bases if not Path(b).is_absolute()]
    for folder in (Path.cwd(), *path.resolve().parents):
        if all((folder / b).is_file() for b in relative):
            return folder
    raise PcdetConfigError(
        f"{path}: its _BASE_CONFIG_ {relative[0]} is found neither in the working directory nor in a folder "
        "above the config (OpenPCDet resolves it from OpenPCDet/tools: run there, or make it absolute)"
    )


@contextlib.contextmanager
def _chdir(folder: Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def load_config(pcdet: ModuleType, cfg_path: str | os.PathLike[str]) -> tuple[Any, Path]:
    """(the merged config, the folder its relative paths resolve against)."""

    path = Path(cfg_path).expanduser()
    if not path.is_file():
        raise PcdetConfigError(f"OpenPCDet config not found: {path}")
    raw = _bounded_yaml(path)
    root = _config_root(path, _base_configs(raw))
    for base in _base_configs(raw):  # OpenPCDet reads them with its own, unbounded YAML loader
        if (root / base).is_file():
            _bounded_yaml(root / base)
    config = copy.deepcopy(pcdet.config.cfg)
    absolute = str(path.resolve())  # before the chdir: a relative path names a file from the caller's folder
    try:
        with _chdir(root):
            pcdet.config.cfg_from_yaml_file(absolute, config)
    except Exception as exc:
        raise PcdetConfigError(f"OpenPCDet cannot read the config {path}: {_exc(exc)}") from exc
    missing = [k for k in ("CLASS_NAMES", "DATA_CONFIG", "MODEL") if k not in config]
    if missing:
        raise PcdetConfigError(f"{path} is not an OpenPCDet model config: no {', '.join(missing)}")
    return config, root


def _select_split(data_cfg: Any, split: str, cfg_name: str) -> None:
    """Point the evaluation mode ('test') at `split` (a `DATA_SPLIT` value, or the mode name itself)."""
    splits = data_cfg.get("DATA_SPLIT")
    if not isinstance(splits, Mapping) or not splits:
        if split in ("val", "test"):
            return
        raise PcdetConfigError(f"--calib-split {split}: {cfg_name} has no DATA_SPLIT to choose it from")
    modes = [m for m in ("test", "train") if splits.get(m) == split] or [
        m for m in splits if splits.get(m) == split
    ]
    mode = modes[0] if modes else (split if split in splits else None)
    if mode is None:
        offered = ", ".join(f"{v} ({m})" for m, v in splits.items())
        raise PcdetConfigError(f"--calib-split {split} is not in {cfg_name}'s DATA_SPLIT: {offered}")
    if mode == "test":
        return
    data_cfg.DATA_SPLIT["test"] = splits[mode]
    info = data_cfg.get("INFO_PATH")
    if isinstance(info, Mapping) and mode in info:
        data_cfg.INFO_PATH["test"] = copy.deepcopy(info[mode])


def root_path(data_cfg: Any, root: Path) -> Path | None:
    data_path = data_cfg.get("DATA_PATH")
    if not data_path:
        return None
    data_path = Path(data_path)
    return data_path if data_path.is_absolute() else root / data_path


def _missing_infos(dataset: Any, data_cfg: Any) -> list[Path]:
    """The evaluation mode's INFO_PATH files that are not in the dataset's folder (OpenPCDet's datasets skip
    missing ones silently and end up with no frames)."""
    infos = data_cfg.get("INFO_PATH")
    folder = getattr(dataset, "root_path", None)
    if not isinstance(infos, Mapping) or folder is None:
        return []
    names = infos.get("test") or []
    paths = [Path(folder) / n for n in ([names] if isinstance(names, str) else names)]
    return [path for path in paths if not path.exists()]


def build_dataset(pcdet: ModuleType, config: Any, root: Path, split: str, cfg_name: str) -> Any:
    _select_split(config.DATA_CONFIG, split, cfg_name)
    data_path = root_path(config.DATA_CONFIG, root)
    if data_path is not None and not data_path.is_dir():
        given = config.DATA_CONFIG.DATA_PATH
        how = (
            ""
            if Path(given).is_absolute()
            else f" (DATA_PATH {given} from {root}, as OpenPCDet's tools/ does)"
        )
        shown = os.path.normpath(data_path)  # tools/../data/x as data/x
        raise CalibrationDataError(f"the dataset folder of {cfg_name} does not exist: {shown}{how}")
    try:
        dataset, _, _ = pcdet.datasets.build_dataloader(
            dataset_cfg=config.DATA_CONFIG,
            class_names=config.CLASS_NAMES,
            batch_size=1,
            dist=False,
            root_path=data_path,
            workers=0,
            logger=log,
            training=False,
        )
    except SensitivityError:
        raise
    except Exception as exc:
        raise CalibrationDataError(
            f"OpenPCDet cannot build the {split} dataset of {cfg_name}: {_exc(exc)}"
        ) from exc
    if len(dataset) == 0:
        missing = _missing_infos(dataset, config.DATA_CONFIG)
        why = f": its info file {missing[0]} does not exist" if missing else ""
        raise CalibrationDataError(f"the {split} split of {cfg_name}'s dataset has no frames{why}")
    return dataset


def make_loader(
    dataset: Any, frames: int | None, batch_size: int, workers: int
) -> torch.utils.data.DataLoader:
    """Batches of `batch_size` over `frames` frames evenly spaced over `dataset` (all of it with None)."""
    if batch_size < 1:
        raise CalibrationDataError(f"--batch-size must be a positive integer, got {batch_size}")
    total = len(dataset)
    if frames is None or frames >= total:
        indices = list(range(total))
    else:
        indices = sorted({int(i) for i in np.linspace(0, total - 1, max(frames, 1)).round()})
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=dataset.collate_batch,
        drop_last=False,
    )
