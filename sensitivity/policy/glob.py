"""Glob patterns over dotted layer names (`dense_head.heads_list.0.hm.1`).

A pattern is split on dots into segments, like a path on slashes:

- `*` matches any run of characters within one segment (never a dot): `heads_list.*.hm` matches
  `heads_list.0.hm` but not `heads_list.0.1.hm`;
- `**` as a whole segment matches zero or more whole segments: `backbone_2d.**` matches `backbone_2d`,
  `backbone_2d.blocks` and `backbone_2d.blocks.0.1`; `**.1` matches `1` and `a.b.1`; `a.**.b` matches
  `a.b` and `a.x.y.b`; `**` alone matches every name;
- `**` inside a segment (`conv**`) is a plain `*`, as in .gitignore;
- `?` matches one character other than a dot;
- every other character is literal (including `[`, `]` and `\\`).

Patterns compile to regular expressions once (cached).
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["compile_glob", "glob_match", "is_literal"]

_ANY_SEGMENTS = "**"


def is_literal(pattern: str) -> bool:
    """True when the pattern has no wildcard, i.e. it names exactly one layer."""
    return "*" not in pattern and "?" not in pattern


def _segment_regex(segment: str) -> str:
    out: list[str] = []
    for char in segment:
        if char == "*":
            if not out or out[-1] != "[^.]*":  # consecutive stars within a segment are one star
                out.append("[^.]*")
        elif char == "?":
            out.append("[^.]")
        else:
            out.append(re.escape(char))
    return "".join(out)


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """The compiled regular expression matching exactly the names `pattern` matches (use `fullmatch`)."""
    segments: list[str] = []
    for segment in pattern.split("."):
        if segment == _ANY_SEGMENTS and segments and segments[-1] == _ANY_SEGMENTS:
            continue  # `**.**` is `**`
        segments.append(segment)
    if segments == [_ANY_SEGMENTS]:
        return re.compile(r".*", re.DOTALL)
    last = len(segments) - 1
    parts: list[str] = []
    for i, segment in enumerate(segments):
        if segment == _ANY_SEGMENTS:
            if i == 0:
                parts.append(r"(?:[^.]*\.)*")  # leading: zero or more segments, each with its dot
            elif i == last:
                parts.append(r"(?:\.[^.]*)*")  # trailing: zero or more segments, each after a dot
            else:
                parts.append(r"\.(?:[^.]*\.)*")  # middle: the dot before the next segment, plus any
            continue
        if i > 0 and segments[i - 1] != _ANY_SEGMENTS:
            parts.append(r"\.")
        parts.append(_segment_regex(segment))
    return re.compile("".join(parts), re.DOTALL)


def glob_match(pattern: str, name: str) -> bool:
    """Whether the dotted layer `name` matches the glob `pattern` (the whole name, not a prefix)."""
    return compile_glob(pattern).fullmatch(name) is not None
