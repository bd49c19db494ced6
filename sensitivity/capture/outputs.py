"""Flatten whatever a model or layer returns into named tensors (tensors, tuples, dicts, `.features`)."""

from __future__ import annotations

from typing import Any

import torch

from sensitivity.errors import SensitivityError

__all__ = ["as_tensor", "flatten_outputs"]


def as_tensor(obj: Any) -> torch.Tensor | None:
    """The tensor a layer produced: itself, or `.features` of a spconv SparseConvTensor."""
    if isinstance(obj, torch.Tensor):
        return obj
    feats = getattr(obj, "features", None)
    return feats if isinstance(feats, torch.Tensor) else None


def _walk(obj: Any, prefix: str, out: dict[str, torch.Tensor], depth: int) -> None:
    if depth > 8:
        return
    t = as_tensor(obj)
    if t is not None:
        if t.is_floating_point() or t.is_complex():
            out[prefix or "output"] = t
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _walk(v, f"{prefix}.{k}" if prefix else str(k), out, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _walk(v, f"{prefix}.{i}" if prefix else str(i), out, depth + 1)


def flatten_outputs(obj: Any, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Named floating-point tensors of a model output; `keys` keeps those paths (or their prefixes) only."""
    flat: dict[str, torch.Tensor] = {}
    _walk(obj, "", flat, 0)
    if keys:
        picked = {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in keys)}
        missing = [p for p in keys if not any(k == p or k.startswith(p + ".") for k in flat)]
        if missing:
            raise SensitivityError(
                f"--outputs {','.join(missing)} not found in the model's outputs; available: {', '.join(flat)}"
            )
        flat = picked
    return flat
