"""Batches: what one model call takes, and everything done to one (moving, cutting, describing, feeding it
to the model with one-line errors).

A *batch* is a tensor (`model(t)`), a tuple or list (`model(*b)`), a dict (`model(b)`: OpenPCDet's
`batch_dict` is one positional argument), or an object that carries tensors in its attributes, such as
spconv's `SparseConvTensor` (`model(obj)`).
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sensitivity.errors import CalibrationDataError, SensitivityError
from sensitivity.errors import describe_exception as _exc
from sensitivity.errors import one_line as _one_line

__all__ = [
    "Batch",
    "batch_len",
    "batch_map",
    "batch_tensors",
    "batch_to",
    "describe_batch",
    "first_sample",
    "run_checked",
    "run_model",
    "split_batch",
    "split_holdout",
    "tensor_fields",
]

Batch = Tensor | tuple | list | dict | Any  # what one model call takes


def tensor_fields(value: Any) -> dict[str, Tensor]:
    """The tensor attributes of an object that is no tensor, container or array (a `SparseConvTensor`'s
    features and indices); empty for anything else."""
    if isinstance(value, (Tensor, np.ndarray, tuple, list, Mapping, str, bytes, type)):
        return {}
    attrs = getattr(value, "__dict__", None)
    if not isinstance(attrs, dict):
        return {}
    return {k: v for k, v in attrs.items() if isinstance(v, Tensor)}


def batch_tensors(value: Any, where: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        yield where, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from batch_tensors(v, f"{where}[{i}]")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from batch_tensors(v, f"{where}[{k!r}]")
    else:
        for k, v in tensor_fields(value).items():
            yield f"{where}.{k}", v


def split_holdout(batches: list[Batch], fraction: float = 0.25) -> tuple[list[Batch], list[Batch]]:
    """(fit, held out): the last `fraction` of the batches (at least one) is held out, in order.

    With a single batch both are `[batch]`: fit and held-out data then coincide, so decisions scored
    on it are not protected from fitting the calibration data (callers may want to warn).
    """
    if not 0.0 < fraction < 1.0:
        raise CalibrationDataError(f"the held-out fraction must be in (0, 1), got {fraction!r}")
    batches = list(batches)
    if not batches:
        raise CalibrationDataError("calibration set is empty: nothing to hold out")
    if len(batches) == 1:
        return batches[:], batches[:]
    n_hold = min(len(batches) - 1, max(1, int(len(batches) * fraction)))
    return batches[:-n_hold], batches[-n_hold:]


def run_model(model: nn.Module, batch: Batch) -> Any:
    """One model call: tensor -> `model(t)`, tuple/list -> `model(*b)`, dict -> `model(dict(b))`.

    The model gets its own copy of every tensor (and dicts as a shallow copy): a model that writes into
    its input (in-place ops on the batch, OpenPCDet storing intermediates in the batch_dict it is given)
    would otherwise change the user's batches, and the FP and quantized passes would see different data.
    One copy of the input per call costs far less than the forward itself."""
    batch = batch_map(batch, Tensor.clone)
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping) or tensor_fields(batch):
        return model(batch)
    raise CalibrationDataError(
        f"cannot feed a {type(batch).__name__} to the model: expected a tensor, tuple, dict or an "
        "object holding tensors"
    )


def batch_map(batch: Any, fn: Any) -> Any:
    """`batch` with `fn` applied to every tensor in nested tuples, lists and dicts (new containers); other
    values kept.

    An object holding tensors is shallow-copied with `fn` applied to its tensor attributes and its dict
    attributes copied: a `SparseConvTensor` caches index pairs in its `indice_dict` as the model runs, and
    those must not land in the user's object."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, tuple):
        items = [batch_map(v, fn) for v in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    if isinstance(batch, list):
        return [batch_map(v, fn) for v in batch]
    if isinstance(batch, Mapping):
        mapped = {k: batch_map(v, fn) for k, v in batch.items()}
        try:
            return type(batch)(mapped)
        except Exception:
            return mapped
    fields = tensor_fields(batch)
    if fields:
        twin = copy.copy(batch)
        for key, value in vars(batch).items():
            if key in fields:
                setattr(twin, key, fn(value))
            elif isinstance(value, dict):
                setattr(twin, key, dict(value))
        return twin
    return batch


def batch_to(batch: Batch, device: torch.device | str) -> Batch:
    """`batch` with every tensor (in nested tuples, lists and dicts) moved to `device`; other values kept."""
    return batch_map(batch, lambda t: t.to(device))


def _leaf(value: Any) -> str:
    if isinstance(value, (Tensor, np.ndarray)):
        dtype = str(value.dtype).removeprefix("torch.")
        device = f"@{value.device}" if isinstance(value, Tensor) and value.device.type != "cpu" else ""
        return f"{dtype}[{', '.join(str(s) for s in value.shape)}]{device}"
    return "None" if value is None else type(value).__name__


def _describe(value: Any, depth: int) -> str:
    if isinstance(value, (tuple, list, Mapping)):
        name = "dict" if isinstance(value, Mapping) else type(value).__name__
        if depth >= 3:
            return f"{name}(…)"
        if isinstance(value, Mapping):
            items = [f"{k}: {_describe(v, depth + 1)}" for k, v in itertools.islice(value.items(), 8)]
        else:
            items = [_describe(v, depth + 1) for v in value[:8]]
        if len(value) > 8:
            items.append(f"… {len(value) - 8} more")
        return f"{name}({', '.join(items)})"
    fields = tensor_fields(value)
    if fields:
        inner = ", ".join(f"{k.lstrip('_')}: {_leaf(v)}" for k, v in itertools.islice(fields.items(), 8))
        return f"{type(value).__name__}({inner})"
    return _leaf(value)


def describe_batch(batch: Any) -> str:
    """Short shape/dtype summary for messages.

    E.g. `tensor float32[8, 3, 32, 32]` or `dict(voxels: float32[1200, 10, 5], batch_size: int)`.
    """
    if isinstance(batch, Tensor):
        return f"tensor {_leaf(batch)}"
    if isinstance(batch, np.ndarray):
        return f"ndarray {_leaf(batch)}"
    return _one_line(_describe(batch, 0), limit=400)


def batch_len(batch: Any) -> int | None:
    """Samples in `batch`: dim 0 of its first tensor (a dict's int `batch_size` first, as in OpenPCDet)."""
    if isinstance(batch, (Tensor, np.ndarray)):
        return int(batch.shape[0]) if batch.ndim else None
    if isinstance(batch, Mapping):
        size = batch.get("batch_size")
        if isinstance(size, int) and not isinstance(size, bool):
            return size
        values: Iterable[Any] = batch.values()
    elif isinstance(batch, (tuple, list)):
        values = batch
    elif tensor_fields(batch):
        size = getattr(batch, "batch_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return size
        values = tensor_fields(batch).values()
    else:
        return None
    for value in values:
        n = batch_len(value)
        if n is not None:
            return n
    return None


def run_checked(model: nn.Module, batch: Batch, index: int) -> Any:
    """Run the model on a batch; whatever the model raises on it (a shape, dtype or type it rejects)
    becomes a one-line CalibrationDataError naming the batch and where in the model it failed."""
    try:
        return run_model(model, batch)
    except SensitivityError:
        raise
    except Exception as exc:
        where = _model_frame(exc)
        hint = ""
        if any(not t.is_floating_point() for _, t in batch_tensors(batch, "")) and isinstance(
            exc, (RuntimeError, TypeError)
        ):
            hint = " (the batch holds integer tensors: convert them to float, or make the model convert)"
        text = str(exc).strip()
        common = isinstance(exc, (RuntimeError, TypeError, ValueError, IndexError, KeyError)) and text
        what = _one_line(text.splitlines()[0]) if common else _exc(exc)
        raise CalibrationDataError(
            f"the model rejected calibration batch {index} ({describe_batch(batch)}): {what}{where}{hint}"
        ) from exc


def _model_frame(exc: BaseException) -> str:
    """` (at file.py:line)` of the innermost traceback frame outside torch and this package, if any."""
    import traceback

    here = str(Path(__file__).resolve().parents[1])
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename
        if path.startswith(here) or f"{os.sep}torch{os.sep}" in path or path.startswith("<"):
            continue
        found = f" (at {Path(path).name}:{frame.lineno})"
    return found


def first_sample(batch: Batch) -> Batch:
    """A batch of one sample where that is unambiguous (tensor / tuple of tensors with one batch size);
    other batches (dicts, mixed) are returned whole. Used to bound memory where one sample suffices."""
    if isinstance(batch, torch.Tensor) and batch.dim() > 0 and batch.shape[0] > 1:
        return batch[:1]
    if (
        isinstance(batch, (tuple, list))
        and batch
        and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in batch)
    ):
        n = {t.shape[0] for t in batch}
        if len(n) == 1 and n.pop() > 1:
            return type(batch)(t[:1] for t in batch)
    return batch


def split_batch(batch: Batch, max_samples: int) -> list[Batch]:
    """`batch` cut into pieces of at most `max_samples` along dim 0, where that is unambiguous (a tensor, or
    a tuple/list of tensors sharing dim 0); any other batch comes back whole. Per-sample models (eval-mode
    CNNs) give the same outputs for the pieces as for the whole."""
    if max_samples < 1:
        return [batch]
    if isinstance(batch, Tensor):
        return list(batch.split(max_samples)) if batch.dim() > 0 and batch.shape[0] > max_samples else [batch]
    if (
        isinstance(batch, (tuple, list))
        and batch
        and all(isinstance(t, Tensor) and t.dim() > 0 for t in batch)
    ):
        sizes = {t.shape[0] for t in batch}
        if len(sizes) == 1 and sizes.pop() > max_samples:
            parts = [t.split(max_samples) for t in batch]
            return [type(batch)(p[i] for p in parts) for i in range(len(parts[0]))]
    return [batch]
