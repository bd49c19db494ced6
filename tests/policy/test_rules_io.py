"""Rules, Policy, and the policy.yaml / exclude.yaml reader and writer."""

from __future__ import annotations

import math
import textwrap
import warnings
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sensitivity.errors import ConfigError, SensitivityError
from sensitivity.policy import (
    ExcludeEntry,
    Policy,
    Rule,
    UnmatchedPatternWarning,
    dump_exclude,
    dump_policy,
    exclusion_policy,
    load_exclude,
    load_exclude_entries,
    load_policy,
    parse_exclude,
    parse_policy,
    write_exclude,
    write_policy,
)
from sensitivity.spec import METHODS

LAYERS = [
    "backbone_2d.blocks.0.0",
    "backbone_2d.blocks.0.1",
    "backbone_2d.blocks.1.0",
    "dense_head.heads_list.0.hm.0",
    "dense_head.heads_list.0.hm.1",
    "dense_head.heads_list.1.hm.1",
]


def example_policy() -> Policy:
    return Policy(
        rules=(
            Rule(
                "dense_head.heads_list.0.hm.1",
                "fp",
                reason="isolated output has 12 non-finite values",
                metrics={"iso_naive_sqnr_db": 3.2, "iso_naive_rel_l1": 0.41, "iso_naive_nonfinite": 12},
            ),
            Rule("backbone_2d.blocks.0.1", "smoothquant", alpha=0.5, granularity="channel", mode="static"),
            Rule("**", "naive"),
        ),
        spec="W8A8",
        meta={"mode": "iso", "thresholds": {"min_sqnr_db": 20.0, "max_rel_l1": 0.1}},
    )


EXPECTED_BODY = """\
version: 1
spec: W8A8
meta:
  mode: iso
  thresholds:
    max_rel_l1: 0.1
    min_sqnr_db: 20.0
rules:
  - match: dense_head.heads_list.0.hm.1
    method: fp
    reason: isolated output has 12 non-finite values
    metrics: {iso_naive_nonfinite: 12.0, iso_naive_rel_l1: 0.41, iso_naive_sqnr_db: 3.2}
  - match: backbone_2d.blocks.0.1
    method: smoothquant
    alpha: 0.5
    granularity: channel
    mode: static
  - match: '**'
    method: naive
"""


def check_one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    message = str(err.value)
    assert "\n" not in message and "\r" not in message, message
    assert isinstance(err.value, SensitivityError)
    return message


# --------------------------------------------------------------------------------------------------------
# Rule and Policy


def test_rule_validation() -> None:
    with pytest.raises(ConfigError, match="unknown method 'int8'"):
        Rule("a", "int8")
    with pytest.raises(ConfigError, match="needs alpha"):
        Rule("a", "smoothquant", granularity="channel")
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        Rule("a", "smoothquant", alpha=1.5, granularity="channel")
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\], got True"):
        Rule("a", "smoothquant", alpha=True, granularity="channel")
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\], got nan"):
        Rule("a", "smoothquant", alpha=math.nan, granularity="channel")
    with pytest.raises(ConfigError, match="needs granularity"):
        Rule("a", "smoothquant", alpha=0.5)
    with pytest.raises(ConfigError, match="granularity must be one of channel, im2col"):
        Rule("a", "smoothquant", alpha=0.5, granularity="tensor")
    with pytest.raises(ConfigError, match="mode must be one of static, dynamic"):
        Rule("a", "smoothquant", alpha=0.5, granularity="channel", mode="lazy")
    for method in ("fp", "naive"):
        with pytest.raises(ConfigError, match=f"alpha applies only to method smoothquant, not {method}"):
            Rule("a", method, alpha=0.5)
        with pytest.raises(ConfigError, match="granularity applies only to method smoothquant"):
            Rule("a", method, granularity="channel")
    with pytest.raises(ConfigError, match="match must be a non-empty"):
        Rule("", "fp")
    with pytest.raises(ConfigError, match="metric 'x' must be a number"):
        Rule("a", "fp", metrics={"x": "big"})


def test_rule_normalizes_and_is_hashable() -> None:
    metrics = {"m": 1}
    rule = Rule("a", "smoothquant", alpha=1, granularity="im2col", metrics=metrics)
    metrics["m"] = 2  # the rule keeps its own copy
    assert rule.alpha == 1.0 and isinstance(rule.alpha, float)
    assert rule.metrics == {"m": 1.0}
    assert hash(rule) == hash(Rule("a", "smoothquant", alpha=1.0, granularity="im2col"))
    assert Rule("a", "fp", metrics=None).metrics == {}


def test_first_match_wins() -> None:
    policy = Policy(
        (
            Rule("dense_head.heads_list.0.hm.1", "fp"),
            Rule("dense_head.**", "smoothquant", alpha=0.7, granularity="channel"),
            Rule("dense_head.heads_list.*.hm.1", "fp"),  # shadowed by the rule above
            Rule("**.0", "naive"),
        )
    )
    assert policy.method_for("dense_head.heads_list.0.hm.1") == "fp"
    assert policy.method_for("dense_head.heads_list.1.hm.1") == "smoothquant"
    assert policy.rule_for("dense_head.heads_list.1.hm.1") is policy.rules[1]
    assert policy.method_for("backbone_2d.blocks.0.0") == "naive"
    assert policy.rule_for("backbone_2d.blocks.0.1") is None
    assert policy.method_for("backbone_2d.blocks.0.1") == "naive"
    assert policy.method_for("backbone_2d.blocks.0.1", default="fp") == "fp"
    assert policy.excluded(LAYERS) == ["dense_head.heads_list.0.hm.1"]
    assert policy.unmatched_rules(LAYERS) == []
    assert policy.unmatched_rules(["x.y"]) == list(policy.rules)
    assert Policy([Rule("x.*", "fp")]).unmatched_rules(iter(LAYERS)) == [Rule("x.*", "fp")]


def test_policy_validation() -> None:
    assert isinstance(Policy([Rule("a", "fp")]).rules, tuple)
    with pytest.raises(ConfigError, match="spec must be of the form"):
        Policy((), spec="W8A17")
    with pytest.raises(ConfigError, match="unsupported policy version 2"):
        Policy((), version=2)
    with pytest.raises(TypeError):
        Policy(("a",))  # type: ignore[arg-type]


def test_exclusion_policy() -> None:
    policy = exclusion_policy([ExcludeEntry("a.b", "r", {"m": 1.0}), ExcludeEntry("c.*")], spec="W4A8")
    assert [r.match for r in policy.rules] == ["a.b", "c.*", "**"]
    assert [r.method for r in policy.rules] == ["fp", "fp", "naive"]
    assert policy.rules[0].reason == "r" and policy.rules[0].metrics == {"m": 1.0}
    assert policy.spec == "W4A8"
    assert policy.excluded(["a.b", "c.d", "e"]) == ["a.b", "c.d"]


# --------------------------------------------------------------------------------------------------------
# writing and round trips


def test_write_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    policy = example_policy()
    write_policy(policy, tmp_path / "a.yaml")
    write_policy(policy, tmp_path / "b.yaml")
    text = (tmp_path / "a.yaml").read_bytes()
    assert text == (tmp_path / "b.yaml").read_bytes()
    assert (
        text.decode().startswith("# ") and "sensitivity apply" in text.decode()
    )  # header: maker + how to edit
    assert text.decode().endswith(EXPECTED_BODY)
    loaded = load_policy(tmp_path / "a.yaml", layers=LAYERS)
    assert loaded == policy
    write_policy(loaded, tmp_path / "c.yaml")
    assert (tmp_path / "c.yaml").read_bytes() == text


def test_written_body_is_exact() -> None:
    text = dump_policy(example_policy())
    header, body = text[: text.index("version:")], text[text.index("version:") :]
    assert body == EXPECTED_BODY
    assert all(line.startswith("#") for line in header.splitlines())
    assert "\r" not in text


def test_floats_rounded_to_6_significant_digits() -> None:
    rule = Rule(
        "a",
        "smoothquant",
        alpha=1 / 3,
        granularity="channel",
        metrics={
            "x": 0.1 + 0.2,
            "y": 123456789.0,
            "z": 1e-9 / 3,
            "n": math.nan,
            "i": math.inf,
            "j": -math.inf,
        },
    )
    text = dump_policy(Policy((rule,)))
    assert "alpha: 0.333333\n" in text
    assert "metrics: {i: .inf, j: -.inf, n: .nan, x: 0.3, y: 123457000.0, z: 3.33333e-10}" in text
    again = parse_policy(text).rules[0]
    assert again.metrics["x"] == 0.3 and again.metrics["y"] == 123457000.0 and math.isnan(again.metrics["n"])
    assert dump_policy(parse_policy(text)) == text  # stable once rounded


def test_special_strings_survive(tmp_path: Path) -> None:
    rules = (
        Rule("0.1", "fp", reason="looks like a float"),
        Rule("true", "fp", reason="a: b # not a comment\nsecond line"),
        Rule("*.x", "naive", reason="ünïcode ✓"),
        Rule("**", "naive"),
    )
    policy = Policy(rules)
    write_policy(policy, tmp_path / "p.yaml")
    assert load_policy(tmp_path / "p.yaml") == policy


def test_empty_policy_round_trips() -> None:
    assert parse_policy(dump_policy(Policy(()))) == Policy(())
    assert parse_policy("version: 1\nrules:\n") == Policy(())


def test_exclude_round_trip(tmp_path: Path) -> None:
    entries = [
        ExcludeEntry(
            "dense_head.heads_list.0.hm.1", "isolated output has 3 non-finite values", {"b": 2, "a": 1}
        ),
        ExcludeEntry("backbone_2d.blocks.1.0"),
    ]
    write_exclude(entries, tmp_path / "e.yaml", spec="W8A8")
    text = (tmp_path / "e.yaml").read_text()
    body = text[text.index("version:") :]
    assert body == textwrap.dedent(
        """\
        version: 1
        spec: W8A8
        exclude:
          - layer: dense_head.heads_list.0.hm.1
            reason: isolated output has 3 non-finite values
            metrics: {a: 1.0, b: 2.0}
          - layer: backbone_2d.blocks.1.0
        """
    )
    assert load_exclude(tmp_path / "e.yaml", layers=LAYERS) == [e.layer for e in entries]
    assert load_exclude_entries(tmp_path / "e.yaml") == entries
    # the dict exclude_by_thresholds returns is accepted too, same bytes
    as_dict = {e.layer: e for e in entries}
    assert dump_exclude(as_dict, "W8A8") == text
    assert parse_exclude(dump_exclude([], "W4A8")) == []


# --------------------------------------------------------------------------------------------------------
# validation messages: one line, naming the key and the line

GOOD_RULES = """\
rules:
  - match: a.b
    method: fp
"""

SQ = "version: 1\nrules:\n  - match: a\n    method: smoothquant\n"
ERRORS = [
    # (text, expected fragment, line)
    ("version: 1\nrule:\n  - match: a\n    method: fp\n", "unknown key 'rule' in the policy", 2),
    ("version: 1\nrule:\n  - match: a\n", "did you mean 'rules'?", 2),
    ("version: 1\nrules:\n  - match: a\n    methd: fp\n", "unknown key 'methd' in rules[0]", 4),
    ("version: 1\nrules:\n  - match: a\n    method: fp\n    methd: fp\n", "did you mean 'method'?", 5),
    ("version: 1\nrules: {match: a, method: fp}\n", "rules must be a list, got a mapping", 2),
    ("version: 1\nrules:\n  - match: 0.1\n    method: fp\n", "match must be a string", 3),
    ("version: 1\nrules:\n  - match: 0.1\n    method: fp\n", "got 0.1; quote it", 3),
    ("version: 1\nrules:\n  - match: a\n    method: int8\n", "rules[0]: unknown method 'int8'", 4),
    ("version: 1\nrules:\n  - match: a\n    method: fp\n  - match: b\n    method: SQ\n", "rules[1]", 6),
    (
        SQ + "    alpha: 1.5\n    granularity: channel\n",
        "rules[0]: alpha must be a number in [0, 1], got 1.5",
        5,
    ),
    (
        SQ + "    alpha: half\n    granularity: channel\n",
        "alpha must be a number in [0, 1], got 'half'",
        5,
    ),
    (
        SQ + "    alpha: -0.1\n    granularity: channel\n",
        "alpha must be a number in [0, 1], got -0.1",
        5,
    ),
    (SQ, "needs alpha", 3),
    (SQ + "    alpha: 0.5\n", "needs granularity", 3),
    ("version: 1\nrules:\n  - match: a\n    method: fp\n    alpha: 0.5\n", "alpha applies only to", 5),
    (
        "version: 1\nrules:\n  - {match: a, method: smoothquant, alpha: 0.5, granularity: row}\n",
        "granularity must be one of channel, im2col, got 'row'",
        3,
    ),
    (
        SQ + "    alpha: 0.5\n    granularity: channel\n    mode: 3\n",
        "mode must be one of static, dynamic, got 3",
        7,
    ),
    ("version: 1\nrules:\n  - match: a\n    method: fp\n    reason: 3\n", "reason must be a string", 5),
    (
        "version: 1\nrules:\n  - match: a\n    method: fp\n    metrics: [1, 2]\n",
        "metrics must be a mapping",
        5,
    ),
    (
        "version: 1\nrules:\n  - match: a\n    method: fp\n    metrics: {rel: high}\n",
        "metric 'rel' must be a number, got 'high'",
        5,
    ),
    ("version: 1\nrules:\n  - fp\n", "rules[0] must be a mapping (match, method, ...), got a string", 3),
    ("version: 1\nrules:\n  - method: fp\n", "missing key 'match' in rules[0]", 3),
    ("version: 1\nrules:\n  - match: a\n", "missing key 'method' in rules[0]", 3),
    ("version: 1\nrules:\n  - match: a\n    method: fp\n    method: naive\n", "duplicate key 'method'", 5),
    ("version: 1\nversion: 1\n" + GOOD_RULES, "duplicate key 'version' in the policy", 2),
    ("version: 2\n" + GOOD_RULES, "unsupported policy version 2; this sensitivity reads version 1", 1),
    ("version: '1'\n" + GOOD_RULES, "version must be an integer, got '1'", 1),
    ("version: 1.0\n" + GOOD_RULES, "version must be an integer, got 1.0", 1),
    ("version: true\n" + GOOD_RULES, "version must be an integer, got True", 1),
    ("# comment\n" + GOOD_RULES, "missing key 'version' in the policy", 2),
    ("version: 1\nspec: W8A17\n" + GOOD_RULES, "spec must be of the form W<bits>A<bits>", 2),
    ("version: 1\nspec: 8\n" + GOOD_RULES, "got 8", 2),
    ("version: 1\nmeta: [1]\n" + GOOD_RULES, "meta must be a mapping", 2),
    ("version: 1\nmeta: {1: a}\n" + GOOD_RULES, "meta keys must be strings", 2),
    ("version: 1\n", "missing key 'rules' in the policy", 1),
    ("- version: 1\n- rules: []\n", "the top level must be a mapping (version, ...), got a list", 1),
    ("\n\njust a string\n", "the top level must be a mapping (version, ...), got a string", 3),
    ("version: 1\nrules:\n  - match: a\n    method: fp\n   bad: indent\n", "invalid YAML", 5),
    ("version: 1\nrules: [a, b\n", "invalid YAML", 3),
    ("version: 1\nrules:\n  - {match: a, method: fp}\n\t- x\n", "invalid YAML", 4),
    ("version: 1\nrules:\n  - match: a\x00\n", "unacceptable character #x0000", 3),
    ("version: 1\nrules: *nope\n", "invalid YAML", 2),
    ("version: 1\n---\nversion: 1\n", "invalid YAML", 2),
    ("version: 1\nrules: !!python/object/apply:os.system ['echo hi']\n", "invalid YAML", 2),
    (
        "version: 1\nrules:\n  - match: a\n    method: fp\n    calibrator: mse\n",
        "rules[0]: calibrator applies only to method naive, not fp",
        5,
    ),
    (
        "version: 1\nrules:\n  - match: a\n    method: naive\n    calibrator: p101\n",
        "rules[0]: calibrator must be max, mse, entropy or p<percentile> (e.g. p99.99), got 'p101'",
        5,
    ),
    (
        "version: 1\nrules:\n  - match: a\n    method: naive\n    calibrator: 99.9\n",
        "rules[0]: calibrator must be max, mse, entropy or p<percentile> (e.g. p99.99), got 99.9",
        5,
    ),
]


@pytest.mark.parametrize(("text", "fragment", "line"), ERRORS)
def test_validation_errors(tmp_path: Path, text: str, fragment: str, line: int) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_policy(path)
    message = check_one_line(err)
    assert message.startswith(f"{path}: ")
    assert fragment in message
    assert f"line {line}" in message


def test_yaml_syntax_error_names_line_and_column() -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy("version: 1\nrules: [a, b\n", "p.yaml")
    assert check_one_line(err).startswith("p.yaml: invalid YAML: ")
    assert "(line 3, column 1)" in str(err.value)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "null\n", "~"])
def test_empty_file(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy(text, "p.yaml")
    assert check_one_line(err).startswith("p.yaml: the file is empty")


def test_unconstructible_values_are_config_errors() -> None:
    for value in ("2001-02-30", "!!float abc", "!!timestamp nope", "!!binary 3", "!!int x", "!!bool maybe"):
        with pytest.raises(ConfigError) as err:
            parse_policy(f"version: 1\nrules: []\nmeta:\n  a: 1\n  when: {value}\n")
        assert "(line 5" in check_one_line(err)
    with pytest.raises(ConfigError, match="nested too deeply"):
        parse_policy("version: 1\nrules: " + "[" * 1000 + "]" * 1000 + "\n")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found") as err:
        load_policy(tmp_path / "missing.yaml")
    check_one_line(err)
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes("version: 1\nrules: []\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(line 3, byte 26\)"):
        load_policy(tmp_path / "latin1.yaml")
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfversion: 1\nrules: []\n")
    assert load_policy(tmp_path / "bom.yaml") == Policy(())


def test_merge_keys_and_anchors_are_accepted() -> None:
    text = textwrap.dedent(
        """\
        version: 1
        sq: &sq {method: smoothquant, alpha: 0.5, granularity: channel}
        rules:
          - {match: a, method: fp}
        """
    )
    with pytest.raises(ConfigError, match=r"unknown key 'sq' in the policy.*\(line 2\)"):
        parse_policy(text)
    text = textwrap.dedent(
        """\
        version: 1
        rules:
          - &sq {match: a, method: smoothquant, alpha: 0.5, granularity: channel}
          - <<: *sq
            match: b
          - <<: *sq
            match: c
            alpha: 2
        """
    )
    with pytest.raises(ConfigError, match=r"rules\[2\]: alpha must be .* \(line 8\)"):
        parse_policy(text)
    policy = parse_policy(text.rsplit("    alpha: 2\n", 1)[0])
    assert [r.match for r in policy.rules] == ["a", "b", "c"]
    assert {r.alpha for r in policy.rules} == {0.5}


# --------------------------------------------------------------------------------------------------------
# checks against the model's layer names


def test_unknown_literal_layer_name_suggests_the_closest(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nrules:\n  - match: '**'\n    method: naive\n  - match: dense_head.heads_list.0.hm.2\n"
        "    method: fp\n"
    )
    with pytest.raises(ConfigError) as err:
        load_policy(path, layers=LAYERS)
    message = check_one_line(err)
    assert "unknown layer name 'dense_head.heads_list.0.hm.2' (line 5)" in message
    assert "did you mean 'dense_head.heads_list.0.hm.1'?" in message
    load_policy(path)  # without layers, no check


def test_unknown_parent_name_hints_at_globstar() -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy("version: 1\nrules:\n  - {match: backbone_2d, method: fp}\n", layers=LAYERS)
    message = check_one_line(err)
    assert "unknown layer name 'backbone_2d' (line 3)" in message
    assert "'backbone_2d.**' matches the layers inside it" in message


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(ConfigError) as err:
        parse_policy("version: 1\nrules:\n  - {match: zzz, method: fp}\n", layers=LAYERS)
    assert check_one_line(err).endswith("unknown layer name 'zzz' (line 3)")


def test_glob_matching_no_layer_only_warns(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "version: 1\nrules:\n  - match: neck.**\n    method: fp\n  - match: '**'\n    method: naive\n"
    )
    with pytest.warns(UnmatchedPatternWarning, match=r"rule 'neck\.\*\*' \(line 3\) matches no layer") as rec:
        policy = load_policy(path, layers=LAYERS)
    assert len(rec) == 1
    assert policy.unmatched_rules(LAYERS) == [policy.rules[0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_policy(path)  # no layers given: nothing to check


def test_exclude_checks_layers(tmp_path: Path) -> None:
    path = tmp_path / "exclude.yaml"
    path.write_text(
        "version: 1\nexclude:\n  - layer: backbone_2d.blocks.0.1\n  - layer: dense_head.**.hm.1\n"
    )
    assert load_exclude(path, layers=LAYERS) == ["backbone_2d.blocks.0.1", "dense_head.**.hm.1"]
    path.write_text("version: 1\nexclude:\n  - layer: neck.*\n  - layer: backbone_2d.block.0.1\n")
    with (
        pytest.raises(ConfigError) as err,
        pytest.warns(UnmatchedPatternWarning, match=r"'neck\.\*' \(line 3\)"),
    ):
        load_exclude(path, layers=LAYERS)
    message = check_one_line(err)
    assert (
        "unknown layer name 'backbone_2d.block.0.1' (line 4); did you mean 'backbone_2d.blocks.0.1'?"
        in message
    )


EXCLUDE_ERRORS = [
    ("version: 1\nexcludes: []\n", "unknown key 'excludes' in the exclude file", 2),
    ("version: 1\nexclude: {layer: a}\n", "exclude must be a list, got a mapping", 2),
    ("version: 1\nexclude:\n  - name: a\n", "unknown key 'name' in exclude[0]", 3),
    ("version: 1\nexclude:\n  - reason: x\n", "missing key 'layer' in exclude[0]", 3),
    (
        "version: 1\nexclude:\n  - a.b\n",
        "exclude[0] must be a mapping (layer, reason, metrics), got a string",
        3,
    ),
    ("version: 1\nexclude:\n  - layer: 7\n", "exclude[0]: layer must be a string", 3),
    ("version: 1\nexclude:\n  - layer: a\n    metrics: 3\n", "metrics must be a mapping", 4),
    ("version: 3\nexclude: []\n", "unsupported exclude file version 3", 1),
    ("exclude: []\n", "missing key 'version' in the exclude file", 1),
    ("[]\n", "the top level must be a mapping", 1),
]


@pytest.mark.parametrize(("text", "fragment", "line"), EXCLUDE_ERRORS)
def test_exclude_validation_errors(text: str, fragment: str, line: int) -> None:
    with pytest.raises(ConfigError) as err:
        parse_exclude(text, "exclude.yaml")
    message = check_one_line(err)
    assert fragment in message
    assert f"line {line}" in message


def test_exclude_null_list_is_empty() -> None:
    assert parse_exclude("version: 1\nspec: W8A8\nexclude:\n") == []


# --------------------------------------------------------------------------------------------------------
# fuzzing: a ConfigError or a Policy, never another exception

FUZZ = settings(
    max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _load_or_config_error(text: str, layers: list[str] | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnmatchedPatternWarning)
        try:
            result = parse_policy(text, "fuzz.yaml", layers)
        except ConfigError as e:
            assert "\n" not in str(e)
        else:
            assert isinstance(result, Policy)
            text = dump_policy(result)  # whatever loads also writes, and the written file is a fixed point
            assert dump_policy(parse_policy(text)) == text


_yaml_chars = st.sampled_from([*"ab01.:-[]{}#&*!|>'\"%@`, \n\t?\\~", "version", "rules", "match", "method"])


@FUZZ
@given(st.one_of(st.text(max_size=200), st.lists(_yaml_chars, max_size=60).map("".join)))
def test_fuzz_arbitrary_text(text: str) -> None:
    _load_or_config_error(text)


_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=10),
    st.sampled_from(["fp", "naive", "smoothquant", "channel", "im2col", "static", "dynamic", "**", "a.*"]),
)
_keys = st.one_of(
    st.sampled_from(["version", "spec", "meta", "rules", *Rule.__dataclass_fields__]), st.text(max_size=5)
)
_values = st.recursive(
    _scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_keys, kids, max_size=5)
)


@FUZZ
@given(_values)
def test_fuzz_nested_structures(data: object) -> None:
    _load_or_config_error(yaml.safe_dump(data))


def _mostly(good: st.SearchStrategy, bad: st.SearchStrategy = _scalars) -> st.SearchStrategy:
    """`good` three times in four: enough valid values that the checks behind the first one get reached."""
    return st.integers(0, 3).flatmap(lambda i: bad if i == 0 else good)


_rule = st.fixed_dictionaries(
    {
        "match": _mostly(st.sampled_from(["a.b", "a.*", "**", "zz", "0.1", "a.c"])),
        "method": _mostly(st.sampled_from(METHODS)),
    },
    optional={
        "alpha": _mostly(st.floats(-0.5, 1.5)),
        "granularity": _mostly(st.sampled_from(["channel", "im2col"])),
        "mode": _mostly(st.sampled_from(["static", "dynamic"])),
        "reason": _mostly(st.text(max_size=20)),
        "metrics": _mostly(st.dictionaries(_mostly(st.text(max_size=8)), _mostly(st.floats()), max_size=3)),
    },
)
# mostly valid at the top, so the fuzzing reaches the rule checks (the top level is fuzzed above)
_policy = st.fixed_dictionaries(
    {"version": st.just(1), "rules": st.lists(_rule, max_size=4)},
    optional={
        "spec": st.one_of(st.just("W8A8"), _scalars),
        "meta": st.dictionaries(st.text(max_size=5), _values),
    },
)


@FUZZ
@given(_policy, st.one_of(st.none(), st.just(["a.b", "a.c", "x"])))
def test_fuzz_near_valid_policies(data: dict, layers: list[str] | None) -> None:
    _load_or_config_error(yaml.safe_dump(data), layers)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=100))
def test_fuzz_files_load_policy_and_exclude(fuzz_dir: Path, raw: bytes) -> None:
    path = fuzz_dir / "p.yaml"
    path.write_bytes(raw)
    for load in (load_policy, load_exclude):
        try:
            load(path, layers=["a.b"])
        except ConfigError as e:
            assert "\n" not in str(e)
