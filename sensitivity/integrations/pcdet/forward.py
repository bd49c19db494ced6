"""`PcdetForward`: an OpenPCDet detector run up to its raw head outputs (box decoding and NMS are CUDA-only)."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.utils.data
from torch import Tensor, nn

from sensitivity.errors import ModelLoadError

log = logging.getLogger("sensitivity.integrations.pcdet")


#: methods where OpenPCDet turns raw head outputs into boxes (and runs NMS): `PcdetForward` stops at them
STOP_METHODS = ("generate_predicted_boxes", "proposal_layer")
#: what `--outputs` selects by default: the dense head's raw maps, per task (see `PcdetForward`)
DEFAULT_OUTPUTS = ("pred_dicts",)


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
