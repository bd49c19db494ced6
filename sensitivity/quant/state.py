"""`QuantState`: what a scan decided and calibrated, per layer, computed once, consumed by everyone.

`apply`, `ScanResult.quantized_model`, the ONNX and pytorch-quantization exports and the report all read
the same frozen object (or its file, `quant_state.pt`): the method of each layer, its activation amax
(refitted on all calibration batches), and for SmoothQuant the factors and the smoothed amax exactly as
decided. Nobody recomputes them; only a user-edited policy that asks a layer for another method makes
`apply` fit that method from the statistics kept here (the per-channel maxima).

On disk it is a plain dict of tensors and strings (`to_dict`, loadable with `torch.load(weights_only=True)`);
`from_dict` checks every field and names, in one line, what is wrong with a damaged or foreign file.
Version 1 files (before the per-layer calibrator) read as version 2 with the spec's calibrator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import torch

from sensitivity.errors import ConfigError, ModelLoadError, SensitivityError
from sensitivity.quant.build import LayerQuant
from sensitivity.spec import METHODS, QuantSpec

__all__ = ["STATE_VERSION", "LayerState", "QuantState"]

STATE_VERSION = 2
_TENSORS = ("input_amax", "weight_amax")
_OPTIONAL_TENSORS = ("channel_absmax", "smooth_scale", "smooth_input_amax")


@dataclass(frozen=True)
class LayerState:
    """One layer's decision and calibration. `input_amax` is the naive activation range (what the layer
    uses when quantized without SmoothQuant); the SmoothQuant fields are set for static SmoothQuant."""

    method: str
    input_amax: torch.Tensor
    input_unsigned: bool
    weight_amax: torch.Tensor
    channel_absmax: torch.Tensor | None = None
    alpha: float | None = None
    granularity: str | None = None
    mode: str | None = None
    smooth_scale: torch.Tensor | None = None
    smooth_input_amax: torch.Tensor | None = None
    #: the activation range a naive layer uses: one of `range_amax`'s keys (None or the spec's own choice:
    #: `input_amax`)
    calibrator: str | None = None
    #: every calibrator choice's amax for this layer (`CALIBRATOR_CHOICES`), so an edited policy may pick
    #: another without recalibrating
    range_amax: Mapping[str, torch.Tensor] | None = None

    # -- the statistics it keeps, as a method's `fit` reads them (`sensitivity.methods.base.LayerStats`) --
    @property
    def chan_absmax(self) -> torch.Tensor | None:
        return self.channel_absmax

    col_absmax = None
    nonnegative = False

    def amax(self, unsigned: bool | None = None) -> torch.Tensor:
        return self.input_amax

    def unsigned(self) -> bool:
        return self.input_unsigned

    def calibrator_amax(self, choice: str, unsigned: bool | None = None) -> torch.Tensor:
        setting = self.naive(choice)
        assert setting.input_amax is not None
        return setting.input_amax

    def naive(self, calibrator: str | None = None) -> LayerQuant:
        """Naive quantization with the spec's range, or with another `calibrator` choice's."""
        if calibrator is None or calibrator == self.calibrator_default:
            return LayerQuant("naive", self.input_amax, self.input_unsigned)
        ranges = self.range_amax or {}
        if calibrator not in ranges:
            known = ", ".join(sorted(ranges)) or "none kept"
            raise ConfigError(
                f"the quant state holds no {calibrator!r} activation range (it holds: {known}): rescan, or "
                "apply with --calib to recalibrate"
            )
        return LayerQuant("naive", ranges[calibrator], self.input_unsigned)

    #: the spec's own calibrator choice (the one `input_amax` holds); set by `QuantState`
    calibrator_default: str | None = field(default=None, compare=False, repr=False)

    def setting(self) -> LayerQuant:
        """How the layer runs under its own method."""
        if self.method == "fp":
            return LayerQuant("fp")
        if self.method == "smoothquant":
            if self.mode == "dynamic":
                return LayerQuant("smoothquant", None, False, None, self.alpha)
            return LayerQuant("smoothquant", self.smooth_input_amax, False, self.smooth_scale)
        return self.naive(self.calibrator)

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "calibrator_default"}
        out["range_amax"] = dict(self.range_amax) if self.range_amax is not None else None
        return out


def _problem(entry: Any, name: str) -> str | None:
    if not isinstance(entry, Mapping):
        return f"layer {name!r}: settings are a {type(entry).__name__}, not a mapping"
    if entry.get("method") not in METHODS:
        return f"layer {name!r}: method {entry.get('method')!r} is not one of {', '.join(METHODS)}"
    for key in _TENSORS:
        if not isinstance(entry.get(key), torch.Tensor):
            return f"layer {name!r}: {key!r} is not a tensor"
    for key in _OPTIONAL_TENSORS:
        if entry.get(key) is not None and not isinstance(entry[key], torch.Tensor):
            return f"layer {name!r}: {key!r} is neither a tensor nor empty"
    if entry["input_amax"].numel() != 1 or not bool(torch.isfinite(entry["input_amax"]).all()):
        return f"layer {name!r}: 'input_amax' is not one finite number"
    ranges = entry.get("range_amax")
    if ranges is not None and not (
        isinstance(ranges, Mapping)
        and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) and v.numel() == 1 for k, v in ranges.items()
        )
    ):
        return f"layer {name!r}: 'range_amax' is not a mapping of calibrator name -> one amax"
    static_sq = entry.get("method") == "smoothquant" and entry.get("mode") != "dynamic"
    if static_sq and entry.get("smooth_scale") is None and entry.get("channel_absmax") is None:
        return f"layer {name!r}: static SmoothQuant without factors or per-channel statistics"
    return None


@dataclass(frozen=True)
class QuantState:
    spec: QuantSpec
    layers: Mapping[str, LayerState]
    folded_bn: Mapping[str, str] = field(default_factory=dict)
    sq_fold: Mapping[str, str] = field(default_factory=dict)
    example_input: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType(dict(self.layers)))
        object.__setattr__(self, "folded_bn", MappingProxyType(dict(self.folded_bn)))
        object.__setattr__(self, "sq_fold", MappingProxyType(dict(self.sq_fold)))

    # -------------------------------------------------------------------------------------- settings
    def configs(self, config: str = "policy", fp_layers: Iterable[str] = ()) -> dict[str, LayerQuant]:
        """Per-layer settings: "policy" (each layer's own method), "naive" (every layer quantized naively)
        or "exclusion" (naive, with `fp_layers` in FP)."""
        fp = set(fp_layers)
        out = {}
        for name, layer in self.layers.items():
            if config == "naive":
                out[name] = layer.naive()
            elif config == "exclusion":
                out[name] = LayerQuant("fp") if name in fp else layer.naive()
            else:
                out[name] = layer.setting()
        return out

    def with_fp(self, names: Iterable[str]) -> QuantState:
        """The same state with `names` kept in FP."""
        moved = {n: replace(self.layers[n], method="fp") for n in names}
        return replace(self, layers={**self.layers, **moved})

    # ------------------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """What quant_state.pt holds: tensors, strings, numbers (weights-only loadable)."""
        return {
            "version": STATE_VERSION,
            "spec": self.spec.to_dict(),
            "folded_bn": dict(self.folded_bn),
            "layers": {n: s.to_dict() for n, s in self.layers.items()},
            "sq_fold": dict(self.sq_fold),
            "example_input": self.example_input,
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "quant state") -> QuantState:
        """A checked state from `to_dict`'s form (or a version 1 file); ModelLoadError names what is wrong."""
        if isinstance(data, QuantState):
            return data
        problem = _state_problem(data)
        if problem:
            raise ModelLoadError(f"{source} is not a usable quant state: {problem}")
        spec = QuantSpec.from_dict(data["spec"])
        keys = set(LayerState.__dataclass_fields__)
        layers = {}
        for name, entry in data["layers"].items():
            values = {k: v for k, v in entry.items() if k in keys}
            values["input_unsigned"] = bool(values.get("input_unsigned", False))
            values.setdefault("calibrator", spec.calibrator_choice)
            if values["calibrator"] == spec.calibrator:  # version 2 files wrote the spec's calibrator name
                values["calibrator"] = spec.calibrator_choice
            values["calibrator_default"] = spec.calibrator_choice
            layers[name] = LayerState(**values)
        return cls(
            spec, layers, data.get("folded_bn", {}), data.get("sq_fold", {}), data.get("example_input")
        )


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, Mapping):
        return f"it holds a {type(state).__name__}, not a quant state (a dict with spec and layers)"
    for key in ("spec", "layers"):
        if key not in state:
            return f"it has no {key!r} entry"
    if not isinstance(state["spec"], Mapping):
        return f"'spec' is a {type(state['spec']).__name__}, not a mapping"
    try:
        QuantSpec.from_dict(dict(state["spec"]))
    except (SensitivityError, TypeError, ValueError) as exc:
        return f"'spec' is not a valid spec ({exc})"
    layers = state["layers"]
    if not isinstance(layers, Mapping) or not layers:
        return "'layers' is not a non-empty mapping of layer name -> settings"
    for name, entry in layers.items():
        problem = _problem(entry, name)
        if problem:
            return problem
    for key in ("folded_bn", "sq_fold"):
        value = state.get(key, {})
        names = isinstance(value, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
        if not names:
            return f"{key!r} is not a mapping of layer names"
    return None
