"""Policy data model: ordered rules mapping layer-name globs to a quantization method.

A `Policy` is an ordered tuple of `Rule`s; the first rule whose `match` glob fits a layer name decides that
layer's method (see `sensitivity.policy.glob` for the pattern syntax). Methods:

- `fp`: the layer stays in floating point (excluded from quantization);
- `naive`: plain W8A8 (or whatever the policy's `spec` says);
- `smoothquant`: SmoothQuant with `alpha` in [0, 1] and `granularity` `channel` (one factor per input
  channel, foldable) or `im2col` (one factor per im2col column, research only); `mode` `static` (factors
  from calibration, the default when omitted) or `dynamic` (per batch).

Rules are validated on construction and raise `ConfigError` with a one-line message; `rule_problem` gives
the same check as `(key, message)` so the YAML reader can point at the offending key's line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sensitivity.errors import ConfigError, short_repr
from sensitivity.policy.glob import glob_match
from sensitivity.spec import GRANULARITIES, METHODS, MODES, calibrator_problem, spec_problem

__all__ = [
    "POLICY_VERSION",
    "ExcludeEntry",
    "Policy",
    "Rule",
    "exclusion_policy",
    "rule_problem",
    "spec_problem",
]

POLICY_VERSION = 1


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metrics_problem(metrics: object) -> str | None:
    if not isinstance(metrics, Mapping):
        return f"metrics must be a mapping of metric name to number, got {type(metrics).__name__}"
    for key, value in metrics.items():
        if not isinstance(key, str):
            return f"metric names must be strings, got {short_repr(key)}"
        if not _is_number(value):
            return f"metric {key!r} must be a number, got {short_repr(value)}"
        if isinstance(value, int) and abs(value) > 2**1023:
            return f"metric {key!r} is too large: {short_repr(value)}"
    return None


def rule_problem(
    match: object,
    method: object,
    alpha: object = None,
    granularity: object = None,
    mode: object = None,
    reason: object = "",
    metrics: object = None,
    calibrator: object = None,
) -> tuple[str, str] | None:
    """The first problem with these rule fields as `(key, message)`, or None when they form a valid rule."""
    if not isinstance(match, str):
        hint = "; quote it" if isinstance(match, (int, float)) else ""
        return "match", f"match must be a string (a layer name or glob), got {short_repr(match)}{hint}"
    if not match or match.strip() != match:
        return (
            "match",
            f"match must be a non-empty layer name or glob without surrounding spaces, got {match!r}",
        )
    if method not in METHODS:
        return "method", f"unknown method {short_repr(method)}; choose one of {', '.join(METHODS)}"
    if method == "smoothquant":
        if alpha is None:
            return "alpha", "method smoothquant needs alpha, a number in [0, 1]"
        if not _is_number(alpha) or not 0 <= alpha <= 1:
            return "alpha", f"alpha must be a number in [0, 1], got {short_repr(alpha)}"
        if granularity is None:
            return "granularity", f"method smoothquant needs granularity, one of {', '.join(GRANULARITIES)}"
        if granularity not in GRANULARITIES:
            return (
                "granularity",
                f"granularity must be one of {', '.join(GRANULARITIES)}, got {short_repr(granularity)}",
            )
        if mode is not None and mode not in MODES:
            return "mode", f"mode must be one of {', '.join(MODES)}, got {short_repr(mode)}"
    else:
        for key, value in (("alpha", alpha), ("granularity", granularity), ("mode", mode)):
            if value is not None:
                return key, f"{key} applies only to method smoothquant, not {method}"
    if calibrator is not None:
        if method != "naive":
            return "calibrator", f"calibrator applies only to method naive, not {method}"
        problem = calibrator_problem(calibrator)
        if problem:
            return "calibrator", problem
    if not isinstance(reason, str):
        return "reason", f"reason must be a string, got {short_repr(reason)}"
    if metrics is not None:
        problem = _metrics_problem(metrics)
        if problem:
            return "metrics", problem
    return None


@dataclass(frozen=True)
class Rule:
    """Layers whose name matches `match` (a glob) get `method`; `reason` and `metrics` say why."""

    match: str
    method: str
    alpha: float | None = None
    granularity: str | None = None  # "channel" | "im2col" (smoothquant only)
    mode: str | None = None  # "static" | "dynamic" (smoothquant only; None means static)
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict, hash=False)
    #: naive only: the activation range, one of `CALIBRATOR_CHOICES` (`p99.99`, `mse`...); None: the spec's
    calibrator: str | None = None

    def __post_init__(self) -> None:
        if self.metrics is None:  # `metrics:` left empty in a file
            object.__setattr__(self, "metrics", {})
        problem = rule_problem(
            self.match, self.method, self.alpha, self.granularity, self.mode, self.reason, self.metrics,
            self.calibrator,
        )  # fmt: skip
        if problem:
            raise ConfigError(f"rule {self.match!r}: {problem[1]}" if problem[0] != "match" else problem[1])
        if self.alpha is not None:
            object.__setattr__(self, "alpha", float(self.alpha))
        # a private copy with float values: the rule stays frozen even if the caller's dict changes
        object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})

    def matches(self, layer: str) -> bool:
        return glob_match(self.match, layer)


@dataclass(frozen=True)
class ExcludeEntry:
    """One layer (or, when user-written, a glob) kept in floating point, with the measured reason."""

    layer: str
    reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.metrics is None:
            object.__setattr__(self, "metrics", {})
        if not isinstance(self.layer, str) or not self.layer or self.layer.strip() != self.layer:
            raise ConfigError(f"layer must be a non-empty layer name or glob, got {short_repr(self.layer)}")
        if not isinstance(self.reason, str):
            raise ConfigError(
                f"exclude {self.layer!r}: reason must be a string, got {short_repr(self.reason)}"
            )
        problem = _metrics_problem(self.metrics)
        if problem:
            raise ConfigError(f"exclude {self.layer!r}: {problem}")
        object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})


@dataclass(frozen=True)
class Policy:
    """Ordered rules, first match wins; layers no rule matches get the caller's default method."""

    rules: tuple[Rule, ...]
    spec: str = "W8A8"
    version: int = POLICY_VERSION
    meta: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        for rule in rules:
            if not isinstance(rule, Rule):
                raise TypeError(f"Policy rules must be Rule instances, got {type(rule).__name__}")
        object.__setattr__(self, "rules", rules)
        problem = spec_problem(self.spec)
        if problem:
            raise ConfigError(problem)
        if self.version != POLICY_VERSION or isinstance(self.version, bool):
            raise ConfigError(
                f"unsupported policy version {short_repr(self.version)}; this sensitivity reads version "
                f"{POLICY_VERSION}"
            )
        if not isinstance(self.meta, Mapping) or not all(isinstance(k, str) for k in self.meta):
            raise ConfigError("meta must be a mapping with string keys")
        object.__setattr__(self, "meta", dict(self.meta))

    def rule_for(self, layer: str) -> Rule | None:
        """The first rule matching `layer`, or None."""
        for rule in self.rules:
            if rule.matches(layer):
                return rule
        return None

    def method_for(self, layer: str, default: str = "naive") -> str:
        rule = self.rule_for(layer)
        return default if rule is None else rule.method

    def excluded(self, layers: Iterable[str]) -> list[str]:
        """The layers (in the given order) this policy keeps in floating point."""
        return [layer for layer in layers if self.method_for(layer) == "fp"]

    def unmatched_rules(self, layers: Iterable[str]) -> list[Rule]:
        """Rules whose pattern matches none of `layers` (typos, or layers renamed since the scan)."""
        names = list(layers)
        return [rule for rule in self.rules if not any(rule.matches(name) for name in names)]


def exclusion_policy(
    excluded: Iterable[ExcludeEntry], spec: str = "W8A8", default: str = "naive", meta: Mapping | None = None
) -> Policy:
    """A policy keeping `excluded` in FP (one `fp` rule each, with its reason) and `default` for the rest."""
    rules = [Rule(e.layer, "fp", reason=e.reason, metrics=e.metrics) for e in excluded]
    rules.append(Rule("**", default))
    return Policy(tuple(rules), spec=spec, meta=dict(meta or {}))
