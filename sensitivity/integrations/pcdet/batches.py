"""OpenPCDet batch_dicts as CPU tensors, read frame by frame with one-line errors."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.utils.data
from torch import Tensor

from sensitivity.errors import CalibrationDataError, SensitivityError
from sensitivity.errors import describe_exception as _exc

log = logging.getLogger("sensitivity.integrations.pcdet")


#: batch_dict keys `load_data_to_gpu` leaves as they are (frame ids, calibration objects, image metadata)
METADATA_KEYS = ("frame_id", "metadata", "calib", "image_paths", "ori_shape", "img_process_infos")


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
