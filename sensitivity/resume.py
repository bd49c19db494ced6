"""Resuming an interrupted scan: the calibration, checkpointed once it is done, replaces the first pass.

The report folder is written atomically at the very end, so an interrupted scan leaves no report; what
it leaves is `.<report>.resume.pt` beside the report folder, holding every layer's calibrated statistics
(input minimum / maximum, per-channel maxima, the calibrator's state) and a fingerprint of what they were
computed from: the model's weights (after BN folding), the calibration batches and the options that shape
calibration. `scan --resume DIR` uses it only when all of that matches, so a resumed scan is the scan that
would have run. The FP / quantized passes that follow calibration are not checkpointed: each is one pass
over the held-out quarter, and their accumulators are only meaningful complete.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sensitivity.capture.observe import LayerObserver
from sensitivity.errors import OutputDirError, SensitivityError
from sensitivity.files import atomic_torch_save

__all__ = [
    "ResumeError",
    "fingerprint",
    "load_calibration_checkpoint",
    "resume_path",
    "save_calibration_checkpoint",
]

FORMAT = "sensitivity-calibration"


class ResumeError(SensitivityError):
    """The resume checkpoint is missing, unreadable, or was made from something else."""


def resume_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.resume.pt"


def _hash_tensors(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _hash_tensors(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _hash_tensors(h, v)
    else:
        h.update(repr(obj).encode())


def fingerprint(model: nn.Module, batches: Sequence[Any], opts: Any) -> str:
    """blake2b of the weights, the calibration batches and the options that shape calibration."""
    h = hashlib.blake2b(digest_size=32)
    _hash_tensors(h, model.state_dict())
    _hash_tensors(h, list(batches))
    keys = (
        "spec",
        "only",
        "skip",
        "fold_bn",
        "holdout",
        "granularities",
        "alphas",
        "sq_mode",
        "calibrator_choices",
    )
    h.update(repr([getattr(opts, k) for k in keys]).encode())
    return h.hexdigest()


def save_calibration_checkpoint(
    path: Path, fingerprint: str, observers: dict[str, LayerObserver], infos: Sequence[Any] = ()
) -> None:
    """Write the calibrated statistics (and the layer shapes the calibration pass recorded) atomically."""
    shapes = {li.name: [list(li.in_shape), list(li.out_shape), int(li.macs), int(li.calls)] for li in infos}
    layers = {}
    for name, obs in observers.items():
        layers[name] = {
            "min_value": obs.min_value,
            "max_abs": obs.max_abs,
            "batches": obs.batches,
            "hist_range": obs.hist_range,
            "chan_absmax": obs.chan_absmax,
            "col_absmax": obs.col_absmax,
            "calibrator": obs.calibrator.state(),
            "range_hist": obs.range_hist.state() if obs.range_hist is not None else None,
            "shapes": shapes.get(name),
        }
    payload = {"format": FORMAT, "version": 1, "fingerprint": fingerprint, "layers": layers}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(payload, path)
    except OSError as exc:
        raise OutputDirError(
            f"cannot write the calibration checkpoint {path}: {exc.strerror or exc}"
        ) from exc


_LAYER_KEYS = ("min_value", "max_abs", "batches", "hist_range", "chan_absmax", "col_absmax", "calibrator")


def _checkpoint_problem(payload: dict[str, Any]) -> str | None:
    if not isinstance(payload.get("fingerprint"), str):
        return "no fingerprint"
    layers = payload.get("layers")
    if not isinstance(layers, dict):
        return "no layers"
    for name, d in layers.items():
        if not isinstance(d, dict) or any(k not in d for k in _LAYER_KEYS):
            return f"layer {name!r} lacks its statistics"
        if not isinstance(d["calibrator"], dict):
            return f"layer {name!r} has no calibrator state"
        if d.get("range_hist") is not None and not isinstance(d["range_hist"], dict):
            return f"layer {name!r} has a damaged range histogram"
    return None


def _restore(
    layers: dict[str, Any], new_observers: Callable[..., dict[str, LayerObserver]]
) -> dict[str, LayerObserver]:
    ranges = {n: d["hist_range"] for n, d in layers.items()}
    observers = new_observers({n: r for n, r in ranges.items() if r is not None})
    for name, obs in observers.items():
        d = layers[name]
        obs.min_value, obs.max_abs, obs.batches = (
            float(d["min_value"]),
            float(d["max_abs"]),
            int(d["batches"]),
        )
        obs.chan_absmax, obs.col_absmax = d["chan_absmax"], d["col_absmax"]
        obs.calibrator.merge_state(d["calibrator"])
        if obs.range_hist is not None and isinstance(d.get("range_hist"), dict):
            obs.range_hist.merge_state(d["range_hist"])
    return observers


def load_calibration_checkpoint(
    path: Path | None,
    fingerprint: str,
    new_observers: Callable[..., dict[str, LayerObserver]],
    infos: Sequence[Any] = (),
) -> dict[str, LayerObserver]:
    """Observers restored from `path` (and `infos` given their recorded shapes); ResumeError when there is
    none or it was made from other inputs."""
    if path is None or not path.exists():
        raise ResumeError(
            f"nothing to resume: no calibration checkpoint at {path} (run the scan without --resume)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ResumeError(f"cannot read the resume checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ResumeError(f"{path} is not a sensitivity calibration checkpoint")
    problem = _checkpoint_problem(payload)
    if problem:
        raise ResumeError(f"{path} is a damaged calibration checkpoint ({problem}): rerun without --resume")
    if payload["fingerprint"] != fingerprint:
        raise ResumeError(
            f"{path} was calibrated on another model, calibration set or options: rerun without --resume"
        )
    try:
        observers = _restore(payload["layers"], new_observers)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ResumeError(
            f"{path} is a damaged calibration checkpoint ({exc}): rerun without --resume"
        ) from exc
    for li in infos:
        shapes = payload["layers"].get(li.name, {}).get("shapes")
        if shapes:
            li.in_shape, li.out_shape, li.macs = tuple(shapes[0]), tuple(shapes[1]), int(shapes[2])
            li.calls = int(shapes[3]) if len(shapes) > 3 else 0
    return observers
