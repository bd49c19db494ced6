"""Calibration batches: loading them safely (batches themselves: `sensitivity.io.batches`).

Sources accepted by `load_calibration`:

- `.pt` / `.pth` (read with `weights_only=True`; pickled Python objects are refused):
  a tensor is samples along dim 0, cut into batches of `batch_size` (the last, partial one kept);
  a list or tuple is a list of ready batches (each a tensor, tuple/list or dict), used as they are;
  a dict is ONE batch (e.g. one OpenPCDet `batch_dict`), never split into samples.
- `.npy`: one array, samples along dim 0.
- `.npz` (read without pickle): an array named `x`, `input` or `inputs` (first found, in that order) is
  the samples and the other arrays are ignored (labels, say); otherwise a single array is the samples;
  otherwise all arrays must share their first dim and each batch is a tuple of their slices in the
  archive's key order (`np.savez(f, a, b)` -> `model(a_i, b_i)`).
- a folder: its `.pt`, `.pth`, `.npy` and `.npz` files (not recursive, hidden files skipped) in sorted
  name order (plain string order: zero-pad numbered names), each contributing its batches; `batch_size`
  applies within each file (samples are never merged across files).
- `pkg.module:function` or `path/to/file.py:function`: called with no arguments; a tensor/array result
  is samples, a dict one batch, anything else is iterated as batches (a list, generator, DataLoader...).
  Iteration stops at `max_batches`, so an endless generator is fine with a limit.

numpy arrays become tensors (sharing memory when possible); dtypes are kept, so integer images stay
integers (the model decides). Floating tensors with NaN/Inf are rejected, naming the batch.
"""

from __future__ import annotations

import itertools
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sensitivity.errors import CalibrationDataError
from sensitivity.errors import describe_exception as _exc
from sensitivity.io.batches import Batch, batch_len, batch_tensors, tensor_fields
from sensitivity.io.callables import resolve_callable
from sensitivity.io.torchfiles import check_file, pickled_object, sniff, torch_load_weights_only

__all__ = ["DATA_SUFFIXES", "check_batch", "load_calibration"]

#: File suffixes read from a calibration folder.
DATA_SUFFIXES = (".pt", ".pth", ".npy", ".npz")
_SAMPLE_KEYS = ("x", "input", "inputs")


# ------------------------------------------------------------------------------------------ conversion
def _to_tensor(array: np.ndarray, where: str) -> Tensor:
    if array.dtype == object:
        raise CalibrationDataError(f"{where} is a numpy object array; calibration data must be numeric")
    try:
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    except TypeError as e:
        raise CalibrationDataError(f"{where} has numpy dtype {array.dtype}, which torch cannot hold") from e


def _convert(value: Any, where: str) -> Any:
    """numpy arrays -> tensors, recursively through tuples, lists and dicts; other values unchanged."""
    if isinstance(value, np.ndarray):
        return _to_tensor(value, where)
    if isinstance(value, tuple):
        items = [_convert(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_convert(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {k: _convert(v, f"{where}[{k!r}]") for k, v in value.items()}
    return value


def _samples(tensors: tuple[Tensor, ...], batch_size: int, where: str) -> Iterator[Batch]:
    """Batches of `batch_size` samples along dim 0 (the last one partial): tensors, or tuples of them."""
    for t in tensors:
        if t.dim() == 0:
            raise CalibrationDataError(f"{where} is a 0-d tensor; samples must lie along dim 0")
    n = tensors[0].shape[0]
    for start in range(0, n, batch_size):
        parts = tuple(t[start : start + batch_size] for t in tensors)
        yield parts[0] if len(parts) == 1 else parts


def _as_batches(obj: Any, batch_size: int, where: str) -> Iterator[Batch]:
    """What one loaded object contributes: samples (tensor / array), one batch (dict), or its items."""
    if isinstance(obj, np.ndarray):
        obj = _to_tensor(obj, where)
    if isinstance(obj, Tensor):
        yield from _samples((obj,), batch_size, where)
    elif isinstance(obj, Mapping):
        yield dict(obj)
    elif isinstance(obj, (list, tuple)):
        yield from obj
    else:
        raise CalibrationDataError(
            f"{where} holds a {type(obj).__name__}; expected a tensor (samples), a list of batches or a dict"
        )


# ------------------------------------------------------------------------------------------- the files
def _read_torch(path: Path, batch_size: int) -> Iterator[Batch]:
    try:
        kind = sniff(path)
    except OSError as e:
        raise CalibrationDataError(f"cannot read calibration file {path}: {_exc(e)}") from e
    if kind == "empty":
        raise CalibrationDataError(f"calibration file {path} is empty")
    if kind == "zip-broken":  # also a CRC mismatch, which torch.load would not notice
        raise CalibrationDataError(
            f"cannot read calibration file {path}: the zip archive is truncated or corrupt"
        )
    if kind == "torchscript":
        raise CalibrationDataError(f"calibration file {path} is a TorchScript archive (a model), not data")
    if kind in ("zip-other", "safetensors", "unknown"):
        raise CalibrationDataError(f"calibration file {path} is not a torch.save file")
    try:
        obj = torch_load_weights_only(path, "cpu")
    except Exception as e:
        refused = pickled_object(e)
        if refused is not None:
            raise CalibrationDataError(
                f"calibration file {path} holds pickled Python objects ({refused}); unpickling can run "
                "arbitrary code, so it is refused (there is no --trust-pickle for data): save tensors, "
                "lists, tuples or dicts of tensors, or pass a pkg.module:function"
            ) from None
        detail = "unexpected end of file" if isinstance(e, EOFError) else _exc(e)
        raise CalibrationDataError(
            f"cannot read calibration file {path}: truncated or corrupt ({detail})"
        ) from e
    return _as_batches(obj, batch_size, str(path))


def _read_numpy(path: Path, batch_size: int) -> Iterator[Batch]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CalibrationDataError(
                f"calibration file {path} holds pickled numpy object arrays; save numeric arrays only"
            ) from None
        raise CalibrationDataError(f"cannot read calibration file {path}: {_exc(e)}") from e
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise CalibrationDataError(
            f"cannot read calibration file {path}: truncated or corrupt ({_exc(e)})"
        ) from e
    if isinstance(loaded, np.ndarray):
        return _as_batches(loaded, batch_size, str(path))
    with loaded:
        try:
            arrays = {key: loaded[key] for key in loaded.files}
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise CalibrationDataError(
                    f"calibration file {path} holds pickled numpy object arrays; save numeric arrays only"
                ) from None
            raise CalibrationDataError(f"cannot read calibration file {path}: {_exc(e)}") from e
        except Exception as e:
            raise CalibrationDataError(
                f"cannot read calibration file {path}: truncated or corrupt ({_exc(e)})"
            ) from e
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise CalibrationDataError(
                f"cannot read calibration file {path}: member {key!r} is not a numpy array"
            )
    if not arrays:
        return iter(())
    key = next((k for k in _SAMPLE_KEYS if k in arrays), None)
    if key is not None or len(arrays) == 1:
        key = key or next(iter(arrays))
        return _as_batches(arrays[key], batch_size, f"{path}[{key!r}]")
    tensors = {k: _to_tensor(a, f"{path}[{k!r}]") for k, a in arrays.items()}
    firsts = {t.shape[0] if t.dim() else None for t in tensors.values()}
    if len(firsts) != 1 or None in firsts:
        shapes = ", ".join(f"{k}: {list(t.shape)}" for k, t in tensors.items())
        raise CalibrationDataError(
            f"{path} holds several arrays with different first dims ({shapes}); name the input array 'x' "
            "or give all arrays the same number of samples"
        )
    return _samples(tuple(tensors.values()), batch_size, str(path))


def _read_file(path: Path, batch_size: int) -> Iterator[Batch]:
    if path.suffix.lower() in (".npy", ".npz"):
        return _read_numpy(path, batch_size)
    return _read_torch(path, batch_size)


def _read_folder(folder: Path, batch_size: int) -> Iterator[Batch]:
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in DATA_SUFFIXES
    )
    for file in files:
        yield from _read_file(file, batch_size)


def _call(spec: str, batch_size: int) -> Iterator[Batch]:
    fn = resolve_callable(spec, "--calib", CalibrationDataError)
    try:
        result = fn()
    except CalibrationDataError:
        raise
    except Exception as e:
        raise CalibrationDataError(f"calibration function {spec!r} raised {_exc(e)}") from e
    if isinstance(result, (Tensor, np.ndarray, Mapping)):
        return _as_batches(result, batch_size, f"the result of {spec}")
    if not isinstance(result, Iterable) or isinstance(result, (str, bytes)):
        raise CalibrationDataError(
            f"calibration function {spec!r} returned a {type(result).__name__}, not an iterable of batches"
        )
    return _guarded(iter(result), spec)


def _guarded(batches: Iterator[Batch], spec: str) -> Iterator[Batch]:
    index = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except CalibrationDataError:
            raise
        except Exception as e:
            raise CalibrationDataError(
                f"calibration function {spec!r} failed producing batch {index}: {_exc(e)}"
            ) from e
        yield batch
        index += 1


def _is_spec(text: str) -> bool:
    module, sep, attr = text.rpartition(":")
    return bool(sep and module and attr) and not Path(text).exists()


# ---------------------------------------------------------------------------------------- validation
def _unsupported_kind(t: Tensor) -> str | None:
    """Why a tensor cannot be calibration data (sparse, nested, meta, quantized, float8...), or None."""
    if t.is_nested:
        return "nested"
    if t.layout != torch.strided:
        return f"{str(t.layout).removeprefix('torch.')} (sparse)"
    if t.device.type == "meta":
        return "meta (no data)"
    if t.is_quantized:
        return f"quantized {str(t.dtype).removeprefix('torch.')}"
    if t.dtype.is_floating_point and t.dtype.itemsize == 1:
        return f"{str(t.dtype).removeprefix('torch.')} (float8)"
    if t.dtype in _BARE_DTYPES:  # unsigned beyond uint8: torch has almost no ops for them
        return str(t.dtype).removeprefix("torch.")
    return None


_BARE_DTYPES = (torch.uint16, torch.uint32, torch.uint64)


def check_batch(batch: Any, index: int, source: str) -> Batch:
    """`batch` if the model can be calibrated on it, else a one-line CalibrationDataError: no sparse,
    nested, meta, quantized or float8 tensors and no NaN/Inf, wherever the tensors sit in the batch."""
    if not isinstance(batch, (Tensor, tuple, list, Mapping)) and not tensor_fields(batch):
        raise CalibrationDataError(
            f"calibration batch {index} from {source} is a {type(batch).__name__}; "
            "expected a tensor, a tuple/list (positional inputs), a dict or an object holding tensors"
        )
    for where, t in batch_tensors(batch, "batch"):
        kind = _unsupported_kind(t)
        if kind:
            at = "" if where == "batch" else f" (at {where})"
            raise CalibrationDataError(
                f"calibration batch {index} from {source} holds a {kind} tensor{at}: give ordinary (dense, "
                "strided) tensors of a standard dtype"
            )
        if t.is_floating_point() or t.is_complex():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                at = "" if where == "batch" else f" (at {where})"
                raise CalibrationDataError(
                    f"calibration batch {index} from {source} has {bad} non-finite values (NaN/Inf){at}"
                )
    return batch


# ----------------------------------------------------------------------------------------------- public
def load_calibration(source: str | Path, batch_size: int = 8, max_batches: int | None = None) -> list[Batch]:
    """The calibration batches in `source` (formats: see the module docstring), at most `max_batches`."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationDataError(f"--batch-size must be a positive integer, got {batch_size!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise CalibrationDataError(f"--batches must be a positive integer, got {max_batches!r}")
    text = str(source).strip()
    if not text:
        raise CalibrationDataError("no calibration data given (--calib)")
    if isinstance(source, str) and _is_spec(text):
        batches: Iterator[Batch] = _call(text, batch_size)
    else:
        path = Path(source)
        if path.is_dir():
            batches = _read_folder(path, batch_size)
        else:
            check_file(path, "calibration data", CalibrationDataError)
            batches = _read_file(path, batch_size)
    result = []
    for index, batch in enumerate(itertools.islice(batches, max_batches)):
        result.append(check_batch(_convert(batch, f"calibration batch {index}"), index, text))
    if not result or all(batch_len(b) == 0 for b in result):
        raise CalibrationDataError(f"calibration set {text} is empty")
    return result
