"""Reading and writing policy.yaml and exclude.yaml: versioned, validated, byte-stable.

policy.yaml (format version 1) — the full per-layer assignment, rules tried in order, first match wins::

    version: 1                  # required; this sensitivity reads version 1
    spec: W8A8                  # optional (default W8A8): W<bits>A<bits>, bits in 2..16
    meta:                       # optional: free-form facts about how the file was made (mapping)
      mode: iso
    rules:                      # required (may be empty): a list of rule mappings
      - match: dense_head.heads_list.0.hm.1          # required: a layer name or a glob
        method: fp                                   # required: fp | naive | smoothquant
        reason: "isolated output has 12 non-finite values"   # optional
        metrics: {iso_naive_rel_l1: 0.41, iso_naive_sqnr_db: 3.2}   # optional: name -> number
      - match: backbone_2d.blocks.0.1
        method: smoothquant
        alpha: 0.5              # smoothquant only, required there: a number in [0, 1]
        granularity: channel    # smoothquant only, required there: channel | im2col
        mode: static            # smoothquant only, optional: static | dynamic
      - match: backbone_2d.blocks.0.4
        method: naive
        calibrator: p99.99      # naive only, optional (default: the spec's): max | p<percentile> | mse
      - match: "**"
        method: naive

exclude.yaml (format version 1) — the layers kept in floating point, each with the measured reason::

    version: 1                  # required
    spec: W8A8                  # optional (default W8A8)
    exclude:                    # required (may be empty or null): a list of entry mappings
      - layer: dense_head.heads_list.0.hm.1          # required: a layer name, or a glob when user-written
        reason: "isolated relative L1 0.183 > 0.1"   # optional
        metrics: {iso_naive_rel_l1: 0.183}           # optional: name -> number

Globs: `*` matches within one name segment, `**` across segments, `?` one character
(see `sensitivity.policy.glob`). Files are read with `yaml.safe_load` only (no tags that build objects);
the node tree (`yaml.compose`) supplies the line numbers for messages. Every problem raises `ConfigError`
with a one-line message naming the file, the key and the line: unknown or duplicate keys, wrong types,
unknown methods, alpha outside [0, 1], unsupported versions, a non-mapping top level, YAML syntax errors
(with line and column) and empty files. Given the model's layer names, a literal name that is no layer is an
error (with the closest name suggested); a glob that matches no layer is only a warning
(`UnmatchedPatternWarning`).

Writers emit keys in a fixed order, metric names sorted, floats rounded to 6 significant digits and no
timestamps, so the same policy always gives the same bytes; a header comment says what made the file and how
to edit it. Comments in a file are not kept when it is rewritten.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from sensitivity.errors import ConfigError, short_repr
from sensitivity.files import atomic_write
from sensitivity.policy.glob import glob_match, is_literal
from sensitivity.policy.rules import (
    POLICY_VERSION,
    ExcludeEntry,
    Policy,
    Rule,
    rule_problem,
    spec_problem,
)
from sensitivity.policy.yamldoc import YamlDoc, line_of, type_name

__all__ = [
    "EXCLUDE_VERSION",
    "UnmatchedPatternWarning",
    "dump_exclude",
    "dump_policy",
    "load_exclude",
    "load_exclude_entries",
    "load_policy",
    "parse_exclude",
    "parse_policy",
    "write_exclude",
    "write_policy",
]

EXCLUDE_VERSION = 1
_POLICY_KEYS = ("version", "spec", "meta", "rules")
_RULE_KEYS = ("match", "method", "alpha", "granularity", "mode", "calibrator", "reason", "metrics")
_EXCLUDE_KEYS = ("version", "spec", "exclude")
_ENTRY_KEYS = ("layer", "reason", "metrics")
_MAX_META_DEPTH = 16

_POLICY_HEADER = """\
# Quantization policy (sensitivity policy format, version 1), written by sensitivity.
# Rules apply in order: the first rule whose `match` fits a layer name decides that layer's method.
# `match` is a layer name or a glob: `*` matches within one name segment, `**` across segments.
# method: fp (keep in floating point) | naive | smoothquant (needs alpha in [0, 1] and
#   granularity: channel | im2col; optional mode: static | dynamic).
# naive takes an optional calibrator (the activation range): max | p99.9 | p99.99 | p99.999 | mse | entropy.
# Edit freely (comments are not kept when sensitivity rewrites the file), then run:
#   sensitivity apply MODEL --policy THIS_FILE
"""

_EXCLUDE_HEADER = """\
# Layers kept in floating point (sensitivity exclude format, version 1), written by sensitivity.
# Each entry names a layer (or a glob: `*` matches within one name segment, `**` across segments)
# with the measured reason. Delete an entry to quantize that layer; add one to keep a layer in FP.
"""


class UnmatchedPatternWarning(UserWarning):
    """A policy rule or exclude glob that matches none of the model's layers."""


# ---------------------------------------------------------------------------------------------------------
# writing


class _FlowMap(dict):
    """A mapping written on one line (`{a: 1, b: 2}`), used for metrics."""


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)  # indent list items under their key

    def ignore_aliases(self, data: Any) -> bool:
        return True  # never `&id001` anchors, even when two rules share one metrics dict


_Dumper.add_representer(
    _FlowMap, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), True)
)


def _round(value: float) -> float:
    """6 significant digits, so a file's bytes do not depend on float noise."""
    value = float(value)
    return float(f"{value:.6g}") if math.isfinite(value) else value


def _plain(value: Any, depth: int = 0) -> Any:
    """Meta values as plain YAML data: sorted mappings, lists, rounded floats."""
    if depth > _MAX_META_DEPTH:
        raise ConfigError(f"meta is nested deeper than {_MAX_META_DEPTH} levels")
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(value[k], depth + 1) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in value]
    raise ConfigError(f"meta values must be YAML data (str, number, bool, list, mapping), got {type(value)}")


def _metrics(metrics: Mapping[str, float]) -> _FlowMap:
    return _FlowMap((k, _round(metrics[k])) for k in sorted(metrics))


def _rule_data(rule: Rule) -> dict[str, Any]:
    data: dict[str, Any] = {"match": rule.match, "method": rule.method}
    if rule.alpha is not None:
        data["alpha"] = _round(rule.alpha)
    if rule.granularity is not None:
        data["granularity"] = rule.granularity
    if rule.mode is not None:
        data["mode"] = rule.mode
    if rule.calibrator is not None:
        data["calibrator"] = rule.calibrator
    if rule.reason:
        data["reason"] = rule.reason
    if rule.metrics:
        data["metrics"] = _metrics(rule.metrics)
    return data


def _dump(header: str, data: dict[str, Any]) -> str:
    body = yaml.dump(
        data, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=4096
    )
    return header + body


def dump_policy(policy: Policy) -> str:
    """The policy.yaml text for `policy` (deterministic: same policy, same text)."""
    data: dict[str, Any] = {"version": policy.version, "spec": policy.spec}
    if policy.meta:
        data["meta"] = _plain(policy.meta)
    data["rules"] = [_rule_data(rule) for rule in policy.rules]
    return _dump(_POLICY_HEADER, data)


def _entries(excluded: Iterable[ExcludeEntry] | Mapping[str, ExcludeEntry]) -> list[ExcludeEntry]:
    return list(excluded.values() if isinstance(excluded, Mapping) else excluded)


def dump_exclude(excluded: Iterable[ExcludeEntry] | Mapping[str, ExcludeEntry], spec: str = "W8A8") -> str:
    """The exclude.yaml text: entries in the given order (table order when generated)."""
    problem = spec_problem(spec)
    if problem:
        raise ConfigError(problem)
    items = []
    for entry in _entries(excluded):
        item: dict[str, Any] = {"layer": entry.layer}
        if entry.reason:
            item["reason"] = entry.reason
        if entry.metrics:
            item["metrics"] = _metrics(entry.metrics)
        items.append(item)
    return _dump(_EXCLUDE_HEADER, {"version": EXCLUDE_VERSION, "spec": spec, "exclude": items})


def _write(text: str, path: str | os.PathLike[str]) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_policy(policy: Policy, path: str | os.PathLike[str]) -> None:
    """Writes policy.yaml (see the module docstring for the format)."""
    _write(dump_policy(policy), path)


def write_exclude(
    excluded: Iterable[ExcludeEntry] | Mapping[str, ExcludeEntry],
    path: str | os.PathLike[str],
    spec: str = "W8A8",
) -> None:
    """Writes exclude.yaml; `excluded` is ExcludeEntry objects (or exclude_by_thresholds' dict of them)."""
    _write(dump_exclude(excluded, spec), path)


# ---------------------------------------------------------------------------------------------------------
# reading


def _meta_problem(value: Any, depth: int = 0, path: tuple[int, ...] = ()) -> str | None:
    if depth > _MAX_META_DEPTH or id(value) in path:
        return f"meta is nested deeper than {_MAX_META_DEPTH} levels"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"meta keys must be strings, got {short_repr(k)}"
            problem = _meta_problem(v, depth + 1, (*path, id(value)))
            if problem:
                return problem
    elif isinstance(value, list):
        for v in value:
            problem = _meta_problem(v, depth + 1, (*path, id(value)))
            if problem:
                return problem
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        return (
            f"meta values must be strings, numbers, booleans, lists or mappings, got {type(value).__name__}"
        )
    return None


def _check_layers(
    doc: YamlDoc, patterns: list[tuple[str, int | None]], layers: Sequence[str], what: str
) -> None:
    names = list(layers)
    known = set(names)
    for pattern, line in patterns:
        if is_literal(pattern):
            if pattern in known:
                continue
            close = difflib.get_close_matches(pattern, names, n=1, cutoff=0.6)
            inside = any(name.startswith(pattern + ".") for name in names)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if inside:
                hint += f" ({pattern + '.**'!r} matches the layers inside it)"
            doc.fail(f"unknown layer name {pattern!r}{f' (line {line})' if line else ''}{hint}")
        elif not any(glob_match(pattern, name) for name in names):
            where = f" (line {line})" if line else ""
            warnings.warn(
                f"{doc.source}: {what} {pattern!r}{where} matches no layer",
                UnmatchedPatternWarning,
                stacklevel=4,
            )


def parse_policy(text: str, source: str = "<policy>", layers: Sequence[str] | None = None) -> Policy:
    """A Policy from policy.yaml text; `source` names the file in messages. See `load_policy`."""
    doc = YamlDoc(text, source, "policy")
    data = doc.data
    lines = doc.fields(doc.node, data, _POLICY_KEYS, ("version", "rules"), "the policy")
    doc.version(data, lines, POLICY_VERSION, "policy")
    spec = doc.spec(data, lines)
    meta = data.get("meta") or {}
    problem = "meta must be a mapping" if not isinstance(meta, dict) else _meta_problem(meta)
    if problem:
        doc.fail(problem, lines.get("meta"))
    rules: list[Rule] = []
    patterns: list[tuple[str, int | None]] = []
    for i, (item, node) in enumerate(doc.items(data, "rules", lines)):
        where = f"rules[{i}]"
        if not isinstance(item, dict):
            doc.fail(f"{where} must be a mapping (match, method, ...), got {type_name(item)}", line_of(node))
        item_lines = doc.fields(node, item, _RULE_KEYS, ("match", "method"), where)
        problem = rule_problem(**item)
        if problem:
            key, message = problem
            doc.fail(f"{where}: {message}", item_lines.get(key, line_of(node)))
        rules.append(Rule(**item))
        patterns.append((item["match"], item_lines.get("match")))
    if layers is not None:
        _check_layers(doc, patterns, layers, "rule")
    return Policy(tuple(rules), spec=spec, version=POLICY_VERSION, meta=meta)


def parse_exclude(
    text: str, source: str = "<exclude>", layers: Sequence[str] | None = None
) -> list[ExcludeEntry]:
    """The entries of exclude.yaml text, in file order. See `load_exclude`."""
    doc = YamlDoc(text, source, "exclude")
    data = doc.data
    lines = doc.fields(doc.node, data, _EXCLUDE_KEYS, ("version", "exclude"), "the exclude file")
    doc.version(data, lines, EXCLUDE_VERSION, "exclude file")
    doc.spec(data, lines)
    entries: list[ExcludeEntry] = []
    patterns: list[tuple[str, int | None]] = []
    for i, (item, node) in enumerate(doc.items(data, "exclude", lines)):
        where = f"exclude[{i}]"
        if not isinstance(item, dict):
            doc.fail(
                f"{where} must be a mapping (layer, reason, metrics), got {type_name(item)}", line_of(node)
            )
        item_lines = doc.fields(node, item, _ENTRY_KEYS, ("layer",), where)
        layer = item["layer"]
        problem = rule_problem(layer, "fp", reason=item.get("reason", ""), metrics=item.get("metrics"))
        if problem:
            key, message = problem
            message = message.replace("match must", "layer must")
            doc.fail(f"{where}: {message}", item_lines.get("layer" if key == "match" else key, line_of(node)))
        entries.append(ExcludeEntry(layer, item.get("reason", ""), item.get("metrics") or {}))
        patterns.append((layer, item_lines.get("layer")))
    if layers is not None:
        _check_layers(doc, patterns, layers, "exclude pattern")
    return entries


def _read(path: str | os.PathLike[str]) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{os.fspath(path)}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{os.fspath(path)}: cannot read: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{os.fspath(path)}: not UTF-8 text (line {line}, byte {e.start})") from None


def load_policy(path: str | os.PathLike[str], layers: Sequence[str] | None = None) -> Policy:
    """Reads and validates policy.yaml (format in the module docstring).

    With `layers` (the model's layer names): a literal `match` that is no layer raises ConfigError
    (naming the closest layer); a glob matching no layer warns (UnmatchedPatternWarning).
    """
    return parse_policy(_read(path), os.fspath(path), layers)


def load_exclude_entries(
    path: str | os.PathLike[str], layers: Sequence[str] | None = None
) -> list[ExcludeEntry]:
    """Reads and validates exclude.yaml; the entries with their reasons, in file order."""
    return parse_exclude(_read(path), os.fspath(path), layers)


def load_exclude(path: str | os.PathLike[str], layers: Sequence[str] | None = None) -> list[str]:
    """Reads and validates exclude.yaml; the layer names / globs kept in FP, in file order."""
    return [entry.layer for entry in load_exclude_entries(path, layers)]
