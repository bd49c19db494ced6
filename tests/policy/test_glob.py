"""Glob semantics over dotted layer names: `*` within a segment, `**` across segments, `?` one char."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensitivity.policy.glob import compile_glob, glob_match, is_literal

CASES = [
    # literal
    ("dense_head.heads_list.0.hm.1", "dense_head.heads_list.0.hm.1", True),
    ("dense_head.heads_list.0.hm.1", "dense_head.heads_list.0.hm.10", False),
    ("dense_head.heads_list.0.hm", "dense_head.heads_list.0.hm.1", False),  # whole name, not a prefix
    ("conv1", "a.conv1", False),
    # `*` stays within one segment
    ("dense_head.heads_list.*.hm.1", "dense_head.heads_list.0.hm.1", True),
    ("dense_head.heads_list.*.hm.1", "dense_head.heads_list.12.hm.1", True),
    ("dense_head.heads_list.*.hm.1", "dense_head.heads_list.0.1.hm.1", False),
    ("dense_head.heads_list.*.hm.1", "dense_head.heads_list..hm.1", True),  # `*` may be empty
    ("*", "conv1", True),
    ("*", "a.conv1", False),
    ("conv*", "conv12", True),
    ("conv*", "conv.1", False),
    ("*.0", "blocks.0", True),
    ("*.0", "a.blocks.0", False),
    ("a.*.c", "a.b.c", True),
    ("a.*.c", "a.c", False),
    # `**` across segments: zero or more whole segments
    ("backbone_2d.**", "backbone_2d.blocks.0.1", True),
    ("backbone_2d.**", "backbone_2d.blocks", True),
    ("backbone_2d.**", "backbone_2d", True),
    ("backbone_2d.**", "backbone_2dx.blocks", False),
    ("backbone_2d.**", "dense_head.backbone_2d.x", False),
    ("**.1", "1", True),
    ("**.1", "a.1", True),
    ("**.1", "a.b.c.1", True),
    ("**.1", "a.b.c.10", False),
    ("**.1", "a.11", False),
    ("a.**.b", "a.b", True),
    ("a.**.b", "a.x.b", True),
    ("a.**.b", "a.x.y.b", True),
    ("a.**.b", "ab", False),
    ("a.**.b", "a.xb", False),
    ("a.**.**.b", "a.x.y.b", True),
    ("**", "anything.at.all", True),
    ("**", "x", True),
    ("**.hm.*", "dense_head.heads_list.0.hm.1", True),
    ("**.hm.*", "dense_head.heads_list.0.hm.1.0", False),
    # `**` inside a segment is a plain `*`
    ("conv**", "conv12", True),
    ("conv**", "conv.12", False),
    # `?` is one character, never a dot
    ("conv?", "conv1", True),
    ("conv?", "conv12", False),
    ("a?b", "a.b", False),
    # regex metacharacters are literal
    ("a+b", "a+b", True),
    ("a+b", "aab", False),
    ("a[0]", "a[0]", True),
    ("a[0]", "a0", False),
    ("a.b", "axb", False),
    ("a$", "a$", True),
    ("(x)|y", "(x)|y", True),
    ("(x)|y", "y", False),
]


@pytest.mark.parametrize(("pattern", "name", "expected"), CASES)
def test_glob_table(pattern: str, name: str, expected: bool) -> None:
    assert glob_match(pattern, name) is expected


def test_is_literal() -> None:
    assert is_literal("dense_head.heads_list.0.hm.1")
    assert is_literal("a[0]+b")
    assert not is_literal("a.*")
    assert not is_literal("**")
    assert not is_literal("conv?")


def test_compile_is_cached() -> None:
    assert compile_glob("backbone.**.conv*") is compile_glob("backbone.**.conv*")


def _seg_match(pattern: str, segment: str) -> bool:
    return fnmatch.fnmatchcase(segment, pattern)  # alphabet below has no `[`: fnmatch is plain * and ?


def _reference(pattern: list[str], name: list[str]) -> bool:
    """Segment-wise matcher written independently of the regex translation."""
    if not pattern:
        return not name
    if pattern[0] == "**":
        return _reference(pattern[1:], name) or (bool(name) and _reference(pattern, name[1:]))
    return bool(name) and _seg_match(pattern[0], name[0]) and _reference(pattern[1:], name[1:])


_name_segment = st.text("ab0_", min_size=1, max_size=3)
_pattern_segment = st.one_of(st.text("ab0*?", min_size=1, max_size=3), st.just("**"))


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_pattern_segment, min_size=1, max_size=4), st.lists(_name_segment, min_size=1, max_size=5))
def test_glob_agrees_with_reference(pattern: list[str], name: list[str]) -> None:
    assert glob_match(".".join(pattern), ".".join(name)) == _reference(pattern, name)
