"""OpenPCDet (`pcdet`) adapter: build a detector from its config, load its checkpoint, calibrate on its dataset.

`pcdet` is imported lazily (`require_pcdet`): it is built from source with CUDA extensions, so
`import sensitivity` never needs it, and every entry point here fails in one line where it is missing.

What it does, with OpenPCDet's own functions wherever one exists:

- the config: `pcdet.config.cfg_from_yaml_file(path, copy.deepcopy(pcdet.config.cfg))` (a copy: the global
  `cfg` is left alone). OpenPCDet resolves `_BASE_CONFIG_` and `DATA_PATH` against the working directory
  (its `tools/` folder by convention); here they resolve against the working directory when the base
  configs are found there, else against the nearest folder above the config file where they are, so the
  CLI runs from anywhere (a relative config path itself is read from the caller's working directory). The
  dataset gets that folder's `DATA_PATH` as its `root_path`; one that does not exist is named in one line.
- the dataset: `pcdet.datasets.build_dataloader(..., dist=False, training=False)` (evaluation mode: no
  augmentation). `split` picks a name from the config's `DATA_SPLIT`: the evaluation split (``val`` in
  OpenPCDet's configs) as is; the training split by pointing the evaluation mode at it (`DATA_SPLIT` and,
  where present, `INFO_PATH`). Frames are taken evenly spaced over the split (nuScenes' 40-frame scenes
  would otherwise make up the whole calibration set), through a DataLoader with the dataset's own
  `collate_batch`. Without the dataset (`build_model`), `pcdet.datasets.DatasetTemplate` supplies what the
  network is built from (grid, ranges, point features), as OpenPCDet's `tools/demo.py` does.
- the network: `pcdet.models.build_network(model_cfg, num_class, dataset)`, then
  `load_params_from_file(filename, logger, to_cpu=True)`. `CenterHead.__init__` calls `.cuda()` on a tensor,
  which fails where CUDA is unavailable: while the network is built there (only then), `torch.Tensor.cuda`
  returns the tensor unchanged (`cuda_calls_stay_on_cpu`). The checkpoint is first read here with
  `weights_only=True` (a pickled object is refused unless `trust_pickle`), and every weight of the network
  must be in it: `load_params_from_file` only logs the ones it skips.
- the forward: `PcdetForward` (below) runs `module_list` and stops before box decoding and NMS (CUDA-only:
  on CPU tensors OpenPCDet's NMS kills the process with no Python error).
- the batches: `batch_to_torch`, the CPU counterpart of `pcdet.models.load_data_to_gpu` (CUDA-only).

Run against the real OpenPCDet CenterPoint (`cbgs_voxel0075_res3d_centerpoint.yaml`, built from source, on
real point clouds read by its own NuScenesDataset: `tests/test_pcdet_real.py`, marker ``pcdet``, where pcdet
imports); CI runs it against a stand-in with OpenPCDet's API names and the real network's traps around the
CenterPoint-shaped model of `sensitivity.demo.centerpoint` (`tests/test_pcdet.py`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import itertools
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch import Tensor, nn

from sensitivity.errors import CalibrationDataError, ModelLoadError, SensitivityError

__all__ = [
    "DEFAULT_OUTPUTS",
    "INSTALL_DOCS",
    "METADATA_KEYS",
    "STOP_METHODS",
    "PcdetConfigError",
    "PcdetForward",
    "PcdetUnavailableError",
    "batch_to_torch",
    "build_from_config",
    "build_model",
    "calibration_batches",
    "cuda_calls_stay_on_cpu",
    "dump_batches",
    "pcdet_available",
    "require_pcdet",
]

log = logging.getLogger(__name__)

INSTALL_DOCS = "https://github.com/open-mmlab/OpenPCDet/blob/master/docs/INSTALL.md"
#: batch_dict keys `load_data_to_gpu` leaves as they are (frame ids, calibration objects, image metadata)
METADATA_KEYS = ("frame_id", "metadata", "calib", "image_paths", "ori_shape", "img_process_infos")
#: methods where OpenPCDet turns raw head outputs into boxes (and runs NMS): `PcdetForward` stops at them
STOP_METHODS = ("generate_predicted_boxes", "proposal_layer")
#: what `--outputs` selects by default: the dense head's raw maps, per task (see `PcdetForward`)
DEFAULT_OUTPUTS = ("pred_dicts",)


class PcdetUnavailableError(SensitivityError, ImportError):
    """`pcdet` (OpenPCDet) is needed but cannot be imported."""


class PcdetConfigError(SensitivityError):
    """An OpenPCDet config that cannot be read or used (missing base config, unknown split...)."""


def _one_line(text: object, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _exc(e: BaseException) -> str:
    msg = _one_line(e)
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ---------------------------------------------------------------------------------------------- import
def require_pcdet() -> ModuleType:
    """The `pcdet` package with `pcdet.config`, `pcdet.datasets` and `pcdet.models` imported, or a one-line
    `PcdetUnavailableError` (missing, or a build whose CUDA extensions do not load)."""
    try:
        pcdet = importlib.import_module("pcdet")
        for sub in ("config", "datasets", "models"):
            importlib.import_module(f"pcdet.{sub}")
    except Exception as exc:
        raise PcdetUnavailableError(
            f"OpenPCDet (pcdet) cannot be imported ({_exc(exc)}); it is built from source with CUDA, see "
            f"{INSTALL_DOCS} - or, where it is installed, write calibration batches with "
            "`sensitivity pcdet-dump` and scan them with --calib"
        ) from exc
    return pcdet


def pcdet_available() -> bool:
    try:
        require_pcdet()
    except PcdetUnavailableError:
        return False
    return True


@contextlib.contextmanager
def cuda_calls_stay_on_cpu() -> Iterator[None]:
    """Within the block, where CUDA is unavailable, `tensor.cuda()` returns the tensor itself.

    For building OpenPCDet networks on CPU machines only (`CenterHead.__init__` puts its class-id mappings
    on the GPU; they are used by box decoding, which `PcdetForward` never runs). Process-wide while it
    lasts (a class attribute of `torch.Tensor`); restored on exit. A no-op where CUDA is available.
    """
    if torch.cuda.is_available():
        yield
        return
    missing = object()
    saved = torch.Tensor.__dict__.get("cuda", missing)

    def _stay(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self

    torch.Tensor.cuda = _stay  # type: ignore[method-assign]
    try:
        yield
    finally:
        if saved is missing:
            del torch.Tensor.cuda
        else:
            torch.Tensor.cuda = saved  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------- forward
class _HeadOutputsReady(Exception):
    """Raised in place of a STOP_METHODS call: the raw head outputs are in `forward_ret_dict`."""


def _stop(*args: Any, **kwargs: Any) -> Any:
    raise _HeadOutputsReady


@contextlib.contextmanager
def _stop_before_boxes(module: nn.Module) -> Iterator[None]:
    """Shadow `module`'s STOP_METHODS with `_stop` for one call (instance attributes, removed after)."""
    missing = object()
    saved = {}
    for name in STOP_METHODS:
        if callable(getattr(module, name, None)):
            saved[name] = module.__dict__.get(name, missing)
            module.__dict__[name] = _stop
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is missing:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = old


def _head_outputs(module: nn.Module) -> Any:
    """The raw outputs a head stored before decoding: CenterHead's `pred_dicts` (per task, a dict of maps),
    else its tensors (anchor heads: `cls_preds`, `box_preds`, `dir_cls_preds`) as a one-element list."""
    ret = getattr(module, "forward_ret_dict", None)
    if not isinstance(ret, Mapping):
        return None
    if ret.get("pred_dicts") is not None:
        return ret["pred_dicts"]
    tensors = {k: v for k, v in ret.items() if isinstance(v, Tensor)}
    return [tensors] if tensors else None


def _not_the_network(detector: nn.Module) -> list[Any]:
    """The detector's attributes that are data, not network: datasets (`detector.dataset` in OpenPCDet), and
    the DataLoader-like objects a user may have attached."""
    return [
        value
        for value in vars(detector).values()
        if isinstance(value, (torch.utils.data.Dataset, torch.utils.data.DataLoader))
    ]


class PcdetForward(nn.Module):
    """An OpenPCDet detector's forward up to its head outputs, for scanning on any device.

    The detector's children are registered on the wrapper under their own names (and its direct buffers,
    `global_step`), so `named_modules()` and `state_dict()` read exactly as the detector's
    (`backbone_3d.conv_input.0`, `dense_head.heads_list.0.hm.1`, ...) and exclude / policy YAMLs use
    OpenPCDet's names. `forward(batch_dict)` runs the modules of `detector.module_list` in order on a
    shallow copy of the batch_dict and stops at the first call of a STOP_METHODS method
    (`generate_predicted_boxes` of dense and point heads, `proposal_layer` of RoI heads), where OpenPCDet
    decodes boxes and runs NMS; `post_processing` is never called. Modules after that point (the point or
    RoI head of a two-stage detector) do not run, so their layers are not scanned.

    Returns the batch_dict with ``pred_dicts`` added: the stopping head's raw outputs from its
    `forward_ret_dict` (CenterHead: a list per task of ``{center, center_z, dim, rot, vel, hm}`` maps
    [B, C, H, W]; anchor heads: ``[{cls_preds, box_preds, dir_cls_preds}]``). Scan with
    ``outputs=DEFAULT_OUTPUTS`` (``--outputs pred_dicts``, the CLI's default with ``--pcdet-cfg``); other
    keys (``spatial_features_2d``, ...) can be selected too. The CenterPoint-shaped model of
    `sensitivity.demo.centerpoint` returns the same ``pred_dicts``, so a scan reads both alike.

    Runs in eval mode (set by the constructor); `detector` keeps the wrapped model (unregistered: its
    modules are the wrapper's). Sparse convs with a bias get `add_cpu_bias_fallback_` (hooks on the shared
    modules), without which spconv refuses them in eval mode on CPU.

    A deep copy (the scan's FP reference and quantized models are copies) copies the network only: the
    detector's dataset (`detector.dataset`, kept by OpenPCDet's `Detector3DTemplate`) is shared, not
    copied. OpenPCDet's datasets cannot be copied: `DatasetTemplate.__getstate__` drops the logger, so a
    copy of a copy raises ``KeyError: 'logger'``, and a dataset that has read a frame holds spconv's
    `Point2VoxelCPU`, which cannot be pickled.
    """

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        modules = list(getattr(detector, "module_list", None) or [])
        if not modules:
            raise ModelLoadError(
                f"{type(detector).__name__} has no module_list: not an OpenPCDet detector (Detector3DTemplate)"
            )
        names = {id(m): n for n, m in detector.named_children()}
        order = []
        for m in modules:
            if id(m) not in names:
                raise ModelLoadError(
                    f"{type(detector).__name__}.module_list holds a {type(m).__name__} that is not one of "
                    "its registered submodules"
                )
            order.append(names[id(m)])
        for name, child in detector.named_children():
            self.add_module(name, child)
        for name, buf in detector.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in detector._non_persistent_buffers_set)
        #: names of the children run by `forward`, in `module_list` order
        self.module_order: tuple[str, ...] = tuple(order)
        object.__setattr__(self, "detector", detector)  # not a submodule: no second set of names
        if any(type(m).__module__.startswith("spconv") for m in self.modules()):
            from sensitivity.integrations.spconv import add_cpu_bias_fallback_

            add_cpu_bias_fallback_(
                self
            )  # OpenPCDet's SubMConv3d(bias=True) refuse eval mode on CPU otherwise
        self.eval()

    def __deepcopy__(self, memo: dict[int, Any]) -> PcdetForward:
        for value in _not_the_network(self.detector):
            memo[id(value)] = value  # shared: the copy's detector refers to the same dataset
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            object.__setattr__(new, key, copy.deepcopy(value, memo))
        return new

    def forward(self, batch_dict: Mapping[str, Any]) -> dict[str, Any]:
        batch_dict = dict(batch_dict)  # OpenPCDet writes into the dict it is given
        last = None
        for name in self.module_order:
            module = getattr(self, name)
            last = module
            try:
                with _stop_before_boxes(module):
                    batch_dict = module(batch_dict)
            except _HeadOutputsReady:
                return {**batch_dict, "pred_dicts": _head_outputs(module)}
        head = getattr(self, "dense_head", None)
        head = last if head is None else head
        outputs = _head_outputs(head) if head is not None else None
        return batch_dict if outputs is None else {**batch_dict, "pred_dicts": outputs}


# -------------------------------------------------------------------------------------------- batches
def _images_to_tensor(value: np.ndarray) -> Tensor:
    """kornia.image_to_tensor: [H, W] -> [1, H, W], [H, W, C] -> [C, H, W], [B, H, W, C] -> [B, C, H, W]."""
    t = torch.from_numpy(np.ascontiguousarray(value))
    if t.dim() == 2:
        t = t.unsqueeze(0)
    elif t.dim() == 3:
        t = t.permute(2, 0, 1)
    elif t.dim() == 4:
        t = t.permute(0, 3, 1, 2)
    return t.float().contiguous()


def batch_to_torch(batch_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A new batch_dict with numpy arrays made CPU tensors as `pcdet.models.load_data_to_gpu` makes them
    CUDA tensors: METADATA_KEYS left as they are, ``images`` [B, H, W, C] -> float [B, C, H, W],
    ``image_shape`` int32, every other numeric array float32 (``voxel_coords`` too: OpenPCDet's modules
    cast it back). Non-numeric arrays (strings, objects), which OpenPCDet cannot convert either, and
    non-array values (``batch_size``, tensors, lists) are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in batch_dict.items():
        if not isinstance(value, np.ndarray) or key in METADATA_KEYS or value.dtype.kind not in "biuf":
            out[key] = value
        elif key == "images":
            out[key] = _images_to_tensor(value)
        elif key == "image_shape":
            out[key] = torch.from_numpy(np.ascontiguousarray(value)).int()
        else:
            out[key] = torch.from_numpy(np.ascontiguousarray(value)).float()
    return out


def read_frames(loader: Iterable[Any], n: int | None = None) -> Iterator[Any]:
    """The first `n` items of `loader`; an error of the dataset's code reading a frame (a lidar file
    its info lists but the disk lacks, say) becomes one `CalibrationDataError` line."""
    items = iter(loader)
    for _ in itertools.count() if n is None else range(n):
        try:
            item = next(items)
        except StopIteration:
            return
        except SensitivityError:
            raise
        except Exception as exc:
            raise CalibrationDataError(f"OpenPCDet's dataset cannot read a frame: {_exc(exc)}") from exc
        yield item


def calibration_batches(loader: Iterable[Mapping[str, Any]], n: int | None = None) -> list[dict[str, Any]]:
    """The first `n` batch_dicts of `loader` (all with `n=None`), as `batch_to_torch` makes them."""
    batches = [batch_to_torch(b) for b in read_frames(loader, n)]
    if not batches:
        raise CalibrationDataError("the OpenPCDet dataset gave no calibration batches (an empty split?)")
    return batches


# --------------------------------------------------------------------------------------------- config
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


def _load_config(pcdet: ModuleType, cfg_path: str | os.PathLike[str]) -> tuple[Any, Path]:
    """(the merged config, the folder its relative paths resolve against)."""
    import yaml

    path = Path(cfg_path).expanduser()
    if not path.is_file():
        raise PcdetConfigError(f"OpenPCDet config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PcdetConfigError(f"cannot read the OpenPCDet config {path}: {_exc(exc)}") from exc
    root = _config_root(path, _base_configs(raw))
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


def _root_path(data_cfg: Any, root: Path) -> Path | None:
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


def _build_dataset(pcdet: ModuleType, config: Any, root: Path, split: str, cfg_name: str) -> Any:
    _select_split(config.DATA_CONFIG, split, cfg_name)
    data_path = _root_path(config.DATA_CONFIG, root)
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


def _loader(dataset: Any, frames: int | None, batch_size: int, workers: int) -> torch.utils.data.DataLoader:
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


# -------------------------------------------------------------------------------------------- network
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
    config, root = _load_config(pcdet, cfg_path)
    cfg_name = Path(cfg_path).name
    ckpt, disk = _read_checkpoint(ckpt_path, trust_pickle)
    dataset = _build_dataset(pcdet, config, root, split, cfg_name)
    model = _network(pcdet, config, dataset, ckpt, disk, cfg_name)
    frames = None if max_batches is None else max_batches * batch_size
    return model, _loader(dataset, frames, batch_size, workers)


def build_model(
    cfg_path: str | os.PathLike[str], ckpt_path: str | os.PathLike[str], *, trust_pickle: bool = False
) -> PcdetForward:
    """The checkpoint's detector without its dataset (for batches dumped with `dump_batches`): the
    network is built on `pcdet.datasets.DatasetTemplate(DATA_CONFIG, CLASS_NAMES, training=False)`, which
    reads no data."""
    pcdet = require_pcdet()
    config, root = _load_config(pcdet, cfg_path)
    cfg_name = Path(cfg_path).name
    ckpt, disk = _read_checkpoint(ckpt_path, trust_pickle)
    try:
        dataset = pcdet.datasets.DatasetTemplate(
            dataset_cfg=config.DATA_CONFIG,
            class_names=config.CLASS_NAMES,
            training=False,
            root_path=_root_path(config.DATA_CONFIG, root),
            logger=log,
        )
    except Exception as exc:
        raise PcdetConfigError(f"OpenPCDet cannot read the DATA_CONFIG of {cfg_name}: {_exc(exc)}") from exc
    return _network(pcdet, config, dataset, ckpt, disk, cfg_name)


# ----------------------------------------------------------------------------------------------- dump
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
    config, root = _load_config(pcdet, cfg_path)
    cfg_name = Path(cfg_path).name
    dataset = _build_dataset(pcdet, config, root, split, cfg_name)
    loader = _loader(dataset, n * batch_size, batch_size, workers)
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
