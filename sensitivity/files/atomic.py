"""Atomic file writes: a temp file beside the target, then os.replace, with the permissions an ordinary
`open()` would give (mkstemp's are private). Written through a Python file object, so a full disk is an
OSError (EFBIG / ENOSPC) the callers turn into one-line errors, not a C++ RuntimeError from torch.save."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_torch_save", "atomic_write", "default_mode", "torch_save_file"]


def default_mode(directory: bool = False) -> int:
    """0o777 / 0o666 less the process umask: what mkdir() / open() would create."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[BinaryIO], object], *, keep_temp: bool = False
) -> Path:
    """Call `write(file)` on a temp file beside `path`, then move it into place. Nothing is left behind
    on failure. With `keep_temp`, return the temp path instead of moving it (a caller replacing several
    files together moves them itself)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.chmod(tmp, default_mode())
        if keep_temp:
            return Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: object, path: str | os.PathLike[str]) -> Path:
    import torch  # here, not at the top: the report package uses this module and never loads torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def torch_save_file(obj: object, path: str | os.PathLike[str]) -> None:
    """`torch.save` through a Python file, so a full disk raises OSError (ENOSPC / EFBIG) rather than the
    C++ writer's RuntimeError (inside a temp folder that is moved into place whole: no atomic write needed)."""
    import torch

    with open(path, "wb") as f:
        torch.save(obj, f)
