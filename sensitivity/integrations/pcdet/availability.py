"""Whether OpenPCDet imports here, its one-line errors, and building its networks on CPU-only machines."""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import torch
import torch.utils.data
from torch import Tensor

from sensitivity.errors import SensitivityError
from sensitivity.errors import describe_exception as _exc

log = logging.getLogger("sensitivity.integrations.pcdet")


INSTALL_DOCS = "https://github.com/open-mmlab/OpenPCDet/blob/master/docs/INSTALL.md"


class PcdetUnavailableError(SensitivityError, ImportError):
    """`pcdet` (OpenPCDet) is needed but cannot be imported."""


class PcdetConfigError(SensitivityError):
    """An OpenPCDet config that cannot be read or used (missing base config, unknown split...)."""


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
