"""Reading a pytorch-quantization checkpoint for the plain FP architecture: its `_input_quantizer` /
`_weight_quantizer` keys come off (the rest loads strictly) and their amax come back, so a scan uses the
checkpoint's own calibration instead of recalibrating. (Writing that layout is
`sensitivity.integrations.pytorch_quantization`.)"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["has_quantizer_keys", "split_checkpoint_amax", "usable_checkpoint_amax"]

#: pytorch-quantization's quantizer submodule names -> our names for the two tensors of a layer
_QUANTIZERS = {"_input_quantizer": "input", "_weight_quantizer": "weight"}
_KEY = re.compile(r"^(?P<layer>.+)\.(?P<quantizer>_input_quantizer|_weight_quantizer)\.(?P<rest>.+)$")


def has_quantizer_keys(state_dict: Mapping[str, Any]) -> bool:
    """True when some key belongs to a pytorch-quantization `_input_quantizer` / `_weight_quantizer`."""
    return any(_KEY.match(k) for k in state_dict)


def split_checkpoint_amax(
    state_dict: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """(the plain FP state dict, {layer: {"input": amax, "weight": amax}}) from a pytorch-quantization one.

    Every `<layer>._input_quantizer.*` / `<layer>._weight_quantizer.*` key is removed, so the rest loads
    strictly into the plain model. A quantizer's range is its `_amax`, or with `learn_amax` its learnt clip
    (`max(-clip_value_min, clip_value_max)`, which is what pytorch-quantization's forward uses then).
    Amax come back as float32: a per-tensor one 0-d, a per-channel one in the stored (keepdims) shape.
    A quantizer with neither (dynamic range, never calibrated) gives no entry.
    """
    plain: dict[str, Any] = {}
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        match = _KEY.match(key)
        if match is None:
            plain[key] = value
            continue
        if isinstance(value, Tensor):
            parts.setdefault((match["layer"], _QUANTIZERS[match["quantizer"]]), {})[match["rest"]] = value
    amax: dict[str, dict[str, Tensor]] = {}
    for (layer, which), tensors in parts.items():
        lo, hi = tensors.get("clip.clip_value_min"), tensors.get("clip.clip_value_max")
        if lo is not None and hi is not None:
            value = torch.maximum(-lo.detach(), hi.detach())
        elif "_amax" in tensors:
            value = tensors["_amax"].detach()
        else:
            continue
        value = value.float().clone()
        amax.setdefault(layer, {})[which] = value.reshape(()) if value.numel() == 1 else value
    return plain, amax


def usable_checkpoint_amax(
    amax: Mapping[str, Mapping[str, Tensor]],
) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """(the entries a scan can use as they are, {layer: why its input amax was dropped}).

    Our activations are quantized per tensor with a finite, positive range: a per-channel input amax, or a
    NaN / zero one (pytorch-quantization's `load_calib_amax(strict=False)` on a layer that saw no data),
    is dropped, and the scan calibrates that layer itself.
    """
    usable: dict[str, dict[str, Tensor]] = {}
    dropped: dict[str, str] = {}
    for layer, entry in amax.items():
        keep = dict(entry)
        value = keep.get("input")
        if value is not None:
            if value.numel() != 1:
                dropped[layer] = f"per-channel input amax {list(value.shape)}"
            elif not (math.isfinite(float(value)) and float(value) > 0):
                dropped[layer] = f"input amax {float(value)}"
            if layer in dropped:
                del keep["input"]
        if keep:
            usable[layer] = keep
    return usable, dropped
