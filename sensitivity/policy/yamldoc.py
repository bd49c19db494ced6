"""A YAML file read for checking: its data, its node tree (for the line numbers of messages) and its name.

Read with `yaml.safe_load` only (no tags that build objects); every problem, from a syntax error to a value
of the wrong type, is one `ConfigError` line naming the file and the line. Anchors and aliases are bounded
before anything is built: a few hundred bytes can expand to billions of values ("billion laughs").
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any, NoReturn

import yaml
from yaml.reader import ReaderError

from sensitivity.errors import ConfigError, one_line, short_repr
from sensitivity.spec import spec_problem

__all__ = ["MAX_YAML_VALUES", "YamlDoc", "expansion", "line_of", "type_name", "value_node"]


def type_name(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)


class YamlDoc:
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
            problem = "; ".join(one_line(p, None) for p in (e.context, e.problem) if p) or "syntax error"
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{self.source}: invalid YAML: {problem}{where}") from None
        except ReaderError as e:
            line = text[: e.position].count("\n") + 1
            char = f"#x{e.character:04x}" if isinstance(e.character, int) else short_repr(e.character)
            raise ConfigError(
                f"{self.source}: invalid YAML: unacceptable character {char} (line {line})"
            ) from None
        except RecursionError:
            raise ConfigError(f"{self.source}: invalid YAML: nested too deeply") from None
        except Exception as e:  # e.g. `2001-02-30` or `!!float abc`: PyYAML's constructors raise ValueError
            bad = _unconstructible(node)
            tag = bad.tag.rsplit(":", 1)[-1] if bad is not None else "value"
            problem = one_line(e, None) if isinstance(e, ValueError) and str(e) else f"not a valid {tag}"
            what = f" {short_repr(bad.value)} ({tag})" if bad is not None else ""
            where = f" (line {line_of(bad)})" if bad is not None else ""
            raise ConfigError(f"{self.source}: invalid YAML value{what}: {problem}{where}") from None
        if size > MAX_YAML_VALUES:
            expands = "a recursive structure" if size == math.inf else f"{int(size):,} values"
            self.fail(
                f"the YAML expands to {expands} through anchors and aliases (at most {MAX_YAML_VALUES:,})"
            )
        if data is None:
            self.fail(f"the file is empty; expected a {what} mapping with keys version, ...")
        if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
            self.fail(f"the top level must be a mapping (version, ...), got {type_name(data)}", line_of(node))
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
                    self.fail(f"duplicate key {key_node.value!r} in {where}", line_of(key_node))
                seen.add(key_node.value)
                key_lines[key_node.value] = line_of(key_node) or 0
                lines[key_node.value] = line_of(value_node) or key_lines[key_node.value]
        here = line_of(node)
        for key in data:
            if not isinstance(key, str) or key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.fail(
                    f"unknown key {short_repr(key)} in {where} (allowed: {', '.join(allowed)}){hint}",
                    key_lines.get(str(key), here),
                )
        for key in required:
            if key not in data:
                self.fail(f"missing key {key!r} in {where}", here)
        return {key: lines.get(key, here or 0) for key in data}

    def version(self, data: dict, lines: dict[str, int], supported: int, what: str) -> None:
        version = data["version"]
        if not isinstance(version, int) or isinstance(version, bool):
            self.fail(f"version must be an integer, got {short_repr(version)}", lines["version"])
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
            self.fail(f"{key} must be a list, got {type_name(value)}", lines[key])
        nodes = value_node(self.node, key)
        item_nodes = nodes.value if isinstance(nodes, yaml.SequenceNode) else []
        if len(item_nodes) != len(value):
            item_nodes = [nodes] * len(value)
        return list(zip(value, item_nodes, strict=True))


#: A policy or exclude file may expand to at most this many values: YAML aliases can make a few hundred
#: bytes expand to billions ("billion laughs"), and everything after parsing walks the expanded data.
MAX_YAML_VALUES = 1_000_000


def expansion(text: str) -> float:
    """How many values `text` expands to through anchors and aliases (inf: a recursive alias), counted on
    its node graph before anything is built: check it before a YAML reader that has no such bound."""
    return _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))


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


def line_of(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None and node.start_mark is not None else None


def value_node(mapping: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(mapping, yaml.MappingNode):
        for key_node, value_node in mapping.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return value_node
    return None
