"""Flatten whatever a model or layer returns into named tensors (tensors, tuples, dicts, `.features`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sensitivity.errors import FPModelError, SensitivityError, SpecError

__all__ = [
    "OutputEnergy",
    "OutputSelector",
    "all_finite",
    "as_tensor",
    "check_fp_outputs",
    "flatten_outputs",
    "relative_sq_error",
    "sq_norm",
]


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


@dataclass(frozen=True)
class OutputSelector:
    """Which model outputs count, by name: all floating-point tensors, those under `keys` (dict paths), or
    what `fn(output) -> {name: tensor}` makes of the output (`--outputs pkg.module:function`), e.g. a
    detector's one tensor of box coordinates and class scores split into `boxes` and `scores`, which are
    in different units and must be measured apart."""

    keys: tuple[str, ...] = ()
    fn: Callable[[Any], Any] | None = None

    def __call__(self, output: Any) -> dict[str, torch.Tensor]:
        if self.fn is None:
            return flatten_outputs(output, list(self.keys) or None)
        try:
            mapped = self.fn(output)
        except SensitivityError:
            raise
        except Exception as exc:
            name = getattr(self.fn, "__name__", "the --outputs function")
            raise SpecError(f"--outputs function {name} raised {type(exc).__name__}: {exc}") from exc
        if isinstance(mapped, torch.Tensor):
            mapped = {"output": mapped}
        flat = flatten_outputs(mapped) if isinstance(mapped, (Mapping, list, tuple)) else {}
        if not flat:
            raise SpecError(
                "--outputs function must return a dict of name -> floating-point tensor, got "
                f"{type(mapped).__name__}"
            )
        return flat


def sq_norm(t: torch.Tensor, minus: torch.Tensor | None = None) -> float:
    """‖t‖² (or ‖t - minus‖²) in float64: the sums every relative output error is made of."""
    d = t.detach().double() if minus is None else t.detach().double() - minus.detach().double()
    return float(torch.linalg.vector_norm(d) ** 2)


@dataclass(frozen=True)
class OutputEnergy:
    """Σ‖y_o‖² of each selected FP output over all held-out batches (all ranks): the one normaliser of the
    relative output MSE Σ_o ‖Δy_o‖² / ‖y_o‖² "on the held-out batches". Each piece then contributes its
    share Σ_o ‖Δy_o‖² / E_o, and the shares add up to the model's value whatever the batches' split into
    pieces or ranks (a per-piece ratio would weight small pieces and near-zero outputs by chance)."""

    totals: Mapping[str, float]

    def share(self, ref: Mapping[str, torch.Tensor], test: Mapping[str, torch.Tensor]) -> float:
        """This piece's part of the relative output MSE (inf where an output is not finite)."""
        total = 0.0
        for key, r in ref.items():
            if key not in test:
                continue
            num = sq_norm(test[key], r)
            den = self.totals.get(key, 0.0)
            if not math.isfinite(num):
                return math.inf
            total += (num / den) if den > 0 else (0.0 if num == 0.0 else math.inf)
        return total

    def scale(self, key: str) -> float | None:
        """sqrt(E_o), what the output probes divide output `key` by (None: unknown or zero)."""
        den = self.totals.get(key, 0.0)
        return math.sqrt(den) if den > 0 and math.isfinite(den) else None


def relative_sq_error(ref: torch.Tensor, test: torch.Tensor) -> float:
    """‖test - ref‖² / ‖ref‖² in float64 (inf where test is not finite; 0 / 0 counts as 0)."""
    den, num = sq_norm(ref), sq_norm(test, ref)
    if not math.isfinite(num):
        return math.inf
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def all_finite(t: torch.Tensor) -> bool:
    """One cheap reduction first (a finite sum proves every element finite); the elementwise check only
    when the sum is not finite (a NaN/Inf, or merely a float overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_fp_outputs(out: Any, index: int) -> None:
    """FPModelError naming the first FP output with NaN/Inf values: nothing to quantize before it is fixed."""
    for key, t in flatten_outputs(out).items():
        if not all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise FPModelError(
                f"the FP model itself produced {bad} NaN/Inf values in output '{key}' on batch {index}: "
                "fix the model or its inputs before quantizing"
            )
