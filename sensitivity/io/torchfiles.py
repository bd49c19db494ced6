"""What a file on disk is (a torch.save zip, TorchScript, a legacy pickle, safetensors...) and reading torch
files without running code: shared by model loading and calibration-data loading."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from sensitivity.errors import SensitivityError
from sensitivity.errors import one_line as _one_line

__all__ = ["check_file", "pickled_object", "sniff", "torch_load_weights_only"]


_UNSAFE_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"GLOBAL (\S+) whose module \S+ is blocked"),
    re.compile(r"unrecognized function (.+?)(?: which belongs|$)"),
    re.compile(r"Can only create new object for .* but got (.+)$"),
    re.compile(r"Can only build Tensor, .* but got (.+)$"),
)


def pickled_object(e: BaseException) -> str | None:
    """The Python object a `weights_only=True` load refused, or None when `e` is not that refusal.

    torch wraps every error of its restricted unpickler into "Weights only load failed ..."; only those
    naming a global, a function call or an object build are "this file holds pickled objects" —
    an unknown opcode or a short read is corruption, not a pickle to trust.
    """
    if not isinstance(e, pickle.UnpicklingError):
        return None
    text = _one_line(e, limit=100_000)
    if "Weights only load failed" not in text:
        return None
    for pattern in _UNSAFE_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).strip().rstrip(".")
    return None


def sniff(path: Path) -> str:
    """File kind by content.

    One of: empty, zip-broken, torch-zip, torchscript, zip-other, pickle, safetensors, unknown.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(path) as z:
                records = {name.split("/", 1)[-1] for name in z.namelist()}
                kind = "torch-zip" if "data.pkl" in records else ""
                kind = "torchscript" if "constants.pkl" in records else kind
                # torch.load does not check the records' CRC-32: a flipped bit would load as another weight
                if kind and z.testzip() is not None:
                    return "zip-broken"
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, NotImplementedError):
            return "zip-broken"
        return kind or "zip-other"
    if head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= path.stat().st_size - 8:
            return "safetensors"
    return "unknown"


def check_file(path: Path, what: str, error: type[SensitivityError]) -> None:
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not os.access(path, os.R_OK):
        raise error(f"{what} {path} is not readable (permission denied)")


def torch_load_weights_only(path: Path, map_location: Any) -> Any:
    """`torch.load(weights_only=True)`; the caller maps `_pickled_object` refusals and corruption."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # protocol/format chatter: the outcome is reported as an error or not
        return torch.load(path, map_location=map_location, weights_only=True)
