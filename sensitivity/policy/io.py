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
from typing import Any, NoReturn

import yaml
from yaml.reader import ReaderError

from sensitivity.errors import ConfigError
from sensitivity.policy.glob import glob_match, is_literal
from sensitivity.policy.rules import (
    POLICY_VERSION,
    ExcludeEntry,
    Policy,
    Rule,
    rule_problem,
    spec_problem,
)

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
_RULE_KEYS = ("match", "method", "alpha", "granularity", "mode", "reason", "metrics")
_EXCLUDE_KEYS = ("version", "spec", "exclude")
_ENTRY_KEYS = ("layer", "reason", "metrics")
_MAX_META_DEPTH = 16

_POLICY_HEADER = """\
# Quantization policy (sensitivity policy format, version 1), written by sensitivity.
# Rules apply in order: the first rule whose `match` fits a layer name decides that layer's method.
# `match` is a layer name or a glob: `*` matches within one name segment, `**` across segments.
# method: fp (keep in floating point) | naive | smoothquant (needs alpha in [0, 1] and
#   granularity: channel | im2col; optional mode: static | dynamic).
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


def _entries(excluded: Iterable[ExcludeEntry] | Mapping[str, tuple[str, Mapping[str, float]]]) -> list:
    if isinstance(excluded, Mapping):  # the dict exclude_by_thresholds returns
        return [ExcludeEntry(layer, reason, dict(metrics)) for layer, (reason, metrics) in excluded.items()]
    return list(excluded)


def dump_exclude(
    excluded: Iterable[ExcludeEntry] | Mapping[str, tuple[str, Mapping[str, float]]], spec: str = "W8A8"
) -> str:
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
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_policy(policy: Policy, path: str | os.PathLike[str]) -> None:
    """Writes policy.yaml (see the module docstring for the format)."""
    _write(dump_policy(policy), path)


def write_exclude(
    excluded: Iterable[ExcludeEntry] | Mapping[str, tuple[str, Mapping[str, float]]],
    path: str | os.PathLike[str],
    spec: str = "W8A8",
) -> None:
    """Writes exclude.yaml; `excluded` is a list of ExcludeEntry or exclude_by_thresholds' dict."""
    _write(dump_exclude(excluded, spec), path)


# ---------------------------------------------------------------------------------------------------------
# reading


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _type_name(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)


class _Doc:
    """One parsed file: its data, its node tree (for line numbers) and its name (for messages)."""

    def __init__(self, text: str, source: str, what: str) -> None:
        self.source = source
        self.node, self.data = self._parse(text, what)

    def fail(self, message: str, line: int | None = None) -> NoReturn:
        where = f" (line {line})" if line else ""
        raise ConfigError(f"{self.source}: {message}{where}")

    def _parse(self, text: str, what: str) -> tuple[yaml.Node | None, Any]:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            size = _expanded_size(node)
            data = yaml.safe_load(text) if size <= MAX_YAML_VALUES else None
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            problem = "; ".join(_one_line(p) for p in (e.context, e.problem) if p) or "syntax error"
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{self.source}: invalid YAML: {problem}{where}") from None
        except ReaderError as e:
            line = text[: e.position].count("\n") + 1
            char = f"#x{e.character:04x}" if isinstance(e.character, int) else _short(e.character)
            raise ConfigError(
                f"{self.source}: invalid YAML: unacceptable character {char} (line {line})"
            ) from None
        except RecursionError:
            raise ConfigError(f"{self.source}: invalid YAML: nested too deeply") from None
        except Exception as e:  # e.g. `2001-02-30` or `!!float abc`: PyYAML's constructors raise ValueError
            bad = _unconstructible(node)
            tag = bad.tag.rsplit(":", 1)[-1] if bad is not None else "value"
            problem = _one_line(e) if isinstance(e, ValueError) and str(e) else f"not a valid {tag}"
            what = f" {_short(bad.value)} ({tag})" if bad is not None else ""
            where = f" (line {_line(bad)})" if bad is not None else ""
            raise ConfigError(f"{self.source}: invalid YAML value{what}: {problem}{where}") from None
        if size > MAX_YAML_VALUES:
            expands = "a recursive structure" if size == math.inf else f"{int(size):,} values"
            self.fail(f"the YAML expands to {expands} through anchors and aliases (at most {MAX_YAML_VALUES:,})")
        if data is None:
            self.fail(f"the file is empty; expected a {what} mapping with keys version, ...")
        if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
            self.fail(f"the top level must be a mapping (version, ...), got {_type_name(data)}", _line(node))
        return node, data

    def fields(
        self, node: yaml.Node | None, data: dict, allowed: Sequence[str], required: Sequence[str], where: str
    ) -> dict[str, int]:
        """Checks the keys of one mapping (unknown, duplicate, missing); returns the line of each value."""
        lines: dict[str, int] = {}
        key_lines: dict[str, int] = {}
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.value == "<<":
                    continue
                if key_node.value in seen:
                    self.fail(f"duplicate key {key_node.value!r} in {where}", _line(key_node))
                seen.add(key_node.value)
                key_lines[key_node.value] = _line(key_node) or 0
                lines[key_node.value] = _line(value_node) or key_lines[key_node.value]
        here = _line(node)
        for key in data:
            if not isinstance(key, str) or key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.fail(
                    f"unknown key {_short(key)} in {where} (allowed: {', '.join(allowed)}){hint}",
                    key_lines.get(str(key), here),
                )
        for key in required:
            if key not in data:
                self.fail(f"missing key {key!r} in {where}", here)
        return {key: lines.get(key, here or 0) for key in data}

    def version(self, data: dict, lines: dict[str, int], supported: int, what: str) -> None:
        version = data["version"]
        if not isinstance(version, int) or isinstance(version, bool):
            self.fail(f"version must be an integer, got {_short(version)}", lines["version"])
        if version != supported:
            self.fail(
                f"unsupported {what} version {version}; this sensitivity reads version {supported}",
                lines["version"],
            )

    def spec(self, data: dict, lines: dict[str, int]) -> str:
        spec = data.get("spec", "W8A8")
        problem = spec_problem(spec)
        if problem:
            self.fail(problem, lines.get("spec"))
        return spec

    def items(self, data: dict, key: str, lines: dict[str, int]) -> list[tuple[Any, yaml.Node | None]]:
        """The list under `key` (null counts as empty), each item with its node."""
        value = data[key]
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(f"{key} must be a list, got {_type_name(value)}", lines[key])
        nodes = _value_node(self.node, key)
        item_nodes = nodes.value if isinstance(nodes, yaml.SequenceNode) else []
        if len(item_nodes) != len(value):
            item_nodes = [nodes] * len(value)
        return list(zip(value, item_nodes, strict=True))


#: A policy or exclude file may expand to at most this many values: YAML aliases can make a few hundred
#: bytes expand to billions ("billion laughs"), and everything after parsing walks the expanded data.
MAX_YAML_VALUES = 1_000_000


def _expanded_size(root: yaml.Node | None) -> float:
    """How many nodes the document has once every alias is expanded (inf for a recursive alias), computed
    on the node graph (each shared node once), so the count itself costs nothing like the expansion."""
    sizes: dict[int, float] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> float:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            return math.inf
        on_path.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        total = 1.0 + sum(size(c) for c in children)
        on_path.discard(key)
        sizes[key] = total
        return total

    return 0 if root is None else size(root)


def _unconstructible(root: yaml.Node | None) -> yaml.ScalarNode | None:
    """The first scalar PyYAML's safe constructor cannot build (its error does not say where)."""
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            try:
                yaml.constructor.SafeConstructor().construct_object(node, deep=True)
            except Exception:
                return node
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))
        elif isinstance(node, yaml.MappingNode):
            stack.extend(n for pair in reversed(node.value) for n in reversed(pair))
    return None


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None and node.start_mark is not None else None


def _value_node(mapping: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(mapping, yaml.MappingNode):
        for key_node, value_node in mapping.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node
    return None


def _meta_problem(value: Any, depth: int = 0, path: tuple[int, ...] = ()) -> str | None:
    if depth > _MAX_META_DEPTH or id(value) in path:
        return f"meta is nested deeper than {_MAX_META_DEPTH} levels"
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return f"meta keys must be strings, got {_short(k)}"
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
    doc: _Doc, patterns: list[tuple[str, int | None]], layers: Sequence[str], what: str
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
    doc = _Doc(text, source, "policy")
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
            doc.fail(f"{where} must be a mapping (match, method, ...), got {_type_name(item)}", _line(node))
        item_lines = doc.fields(node, item, _RULE_KEYS, ("match", "method"), where)
        problem = rule_problem(**item)
        if problem:
            key, message = problem
            doc.fail(f"{where}: {message}", item_lines.get(key, _line(node)))
        rules.append(Rule(**item))
        patterns.append((item["match"], item_lines.get("match")))
    if layers is not None:
        _check_layers(doc, patterns, layers, "rule")
    return Policy(tuple(rules), spec=spec, version=POLICY_VERSION, meta=meta)


def parse_exclude(
    text: str, source: str = "<exclude>", layers: Sequence[str] | None = None
) -> list[ExcludeEntry]:
    """The entries of exclude.yaml text, in file order. See `load_exclude`."""
    doc = _Doc(text, source, "exclude")
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
                f"{where} must be a mapping (layer, reason, metrics), got {_type_name(item)}", _line(node)
            )
        item_lines = doc.fields(node, item, _ENTRY_KEYS, ("layer",), where)
        layer = item["layer"]
        problem = rule_problem(layer, "fp", reason=item.get("reason", ""), metrics=item.get("metrics"))
        if problem:
            key, message = problem
            message = message.replace("match must", "layer must")
            doc.fail(f"{where}: {message}", item_lines.get("layer" if key == "match" else key, _line(node)))
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
