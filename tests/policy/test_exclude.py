"""Exclusion by thresholds on the LayerTable: which layers stay in FP, and the sentence saying why."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from sensitivity.errors import ConfigError
from sensitivity.policy import (
    DEFAULT_MAX_REL_L1,
    DEFAULT_MIN_SQNR_DB,
    ExcludeEntry,
    Thresholds,
    exclude_by_thresholds,
    exclusion_policy,
    load_exclude_entries,
    parse_policy,
    write_exclude,
)
from sensitivity.policy.io import dump_policy


def make_table(
    rows: dict[str, tuple[float, float, float]], mode: str = "iso", method: str = "naive"
) -> pd.DataFrame:
    """A LayerTable slice: index = layer name in execution order, `{mode}_{method}_{metric}` columns."""
    names = list(rows)
    table = pd.DataFrame(
        {
            "name": names,
            "type": ["Conv2d"] * len(names),
            "order": range(len(names)),
            f"{mode}_{method}_l1": [0.01] * len(names),
            f"{mode}_{method}_rel_l1": [r[0] for r in rows.values()],
            f"{mode}_{method}_sqnr_db": [r[1] for r in rows.values()],
            f"{mode}_{method}_nonfinite": [r[2] for r in rows.values()],
        }
    )
    table.index = pd.Index(names, name="layer")
    return table


TABLE = make_table(
    {
        "backbone.conv1": (0.01, 40.0, 0),  # fine
        "backbone.conv2": (0.183, 25.0, 0),  # relative L1 too high
        "backbone.conv3": (0.05, 12.4, 0),  # SQNR too low
        "head.hm.0": (0.41, 3.2, 37),  # everything wrong
        "head.hm.1": (0.02, 30.0, 1),  # one NaN
        "head.reg": (0.1, 20.0, 0),  # exactly at the thresholds: kept
    }
)


# The reason texts below are checked against these explicit limits, independent of the measured defaults.
T = Thresholds(max_rel_l1=0.1, min_sqnr_db=20.0)


def test_defaults_are_named_constants() -> None:
    assert Thresholds() == Thresholds(DEFAULT_MAX_REL_L1, DEFAULT_MIN_SQNR_DB, True)
    assert (DEFAULT_MAX_REL_L1, DEFAULT_MIN_SQNR_DB) == (0.15, 15.0)


def test_reasons_and_metrics_in_table_order() -> None:
    excluded = exclude_by_thresholds(TABLE, T)
    assert list(excluded) == ["backbone.conv2", "backbone.conv3", "head.hm.0", "head.hm.1"]
    assert excluded["backbone.conv2"].reason == "isolated relative L1 0.183 > 0.1"
    assert excluded["backbone.conv3"].reason == "isolated SQNR 12.4 dB < 20 dB"
    assert excluded["head.hm.0"].reason == (
        "isolated output has 37 non-finite values; isolated relative L1 0.41 > 0.1; "
        "isolated SQNR 3.2 dB < 20 dB"
    )
    assert excluded["head.hm.1"].reason == "isolated output has 1 non-finite value"
    assert excluded["head.hm.0"].metrics == {
        "iso_naive_rel_l1": 0.41,
        "iso_naive_sqnr_db": 3.2,
        "iso_naive_nonfinite": 37.0,
    }
    assert all(isinstance(v, float) for entry in excluded.values() for v in entry.metrics.values())


def test_default_thresholds_when_none_given() -> None:
    assert exclude_by_thresholds(TABLE) == exclude_by_thresholds(TABLE, Thresholds())


def test_each_criterion_can_be_switched_off() -> None:
    only_nan = exclude_by_thresholds(TABLE, Thresholds(max_rel_l1=None, min_sqnr_db=None))
    assert list(only_nan) == ["head.hm.0", "head.hm.1"]
    assert only_nan["head.hm.0"].reason == "isolated output has 37 non-finite values"
    no_nan = exclude_by_thresholds(TABLE, Thresholds(0.1, 20.0, nonfinite=False))
    assert list(no_nan) == ["backbone.conv2", "backbone.conv3", "head.hm.0"]
    assert exclude_by_thresholds(TABLE, Thresholds(None, None, False)) == {}
    stricter = exclude_by_thresholds(TABLE, Thresholds(max_rel_l1=0.015, min_sqnr_db=35, nonfinite=False))
    assert list(stricter) == list(TABLE.index[1:])
    assert stricter["head.hm.1"].reason == "isolated relative L1 0.02 > 0.015; isolated SQNR 30 dB < 35 dB"


def test_only_needed_columns_are_required() -> None:
    table = TABLE.drop(columns=["iso_naive_sqnr_db", "iso_naive_nonfinite"])
    excluded = exclude_by_thresholds(table, Thresholds(0.1, min_sqnr_db=None, nonfinite=False))
    assert list(excluded) == ["backbone.conv2", "head.hm.0"]
    assert excluded["head.hm.0"].metrics == {"iso_naive_rel_l1": 0.41}


def test_value_close_to_threshold_gets_more_digits() -> None:
    table = make_table({"a": (0.1004, 19.9996, 0)})
    reason = exclude_by_thresholds(table, T)["a"].reason
    assert reason == "isolated relative L1 0.1004 > 0.1; isolated SQNR 19.9996 dB < 20 dB"


def test_nan_metrics_do_not_exclude_but_infinities_do() -> None:
    table = make_table(
        {"zero": (math.nan, math.nan, 0), "dead": (math.inf, -math.inf, 0), "clean": (0.0, math.inf, 0)}
    )
    excluded = exclude_by_thresholds(table, T)
    assert list(excluded) == ["dead"]
    assert excluded["dead"].reason == "isolated relative L1 inf > 0.1; isolated SQNR -inf dB < 20 dB"


def test_cumulative_mode_and_other_methods() -> None:
    cum = exclude_by_thresholds(make_table({"a": (0.5, 30.0, 2)}, mode="cum"), T, mode="cum")
    assert cum["a"].reason == "cumulative output has 2 non-finite values; cumulative relative L1 0.5 > 0.1"
    assert set(cum["a"].metrics) == {"cum_naive_rel_l1", "cum_naive_sqnr_db", "cum_naive_nonfinite"}
    sq = exclude_by_thresholds(make_table({"a": (0.5, 30.0, 0)}, method="sq_a0.5"), T, method="sq_a0.5")
    assert sq["a"].reason == "isolated sq_a0.5 relative L1 0.5 > 0.1"


def test_missing_columns_and_bad_mode() -> None:
    with pytest.raises(ConfigError) as err:
        exclude_by_thresholds(TABLE, method="smoothquant")
    message = str(err.value)
    assert (
        message
        == "the layer table has no column 'iso_smoothquant_rel_l1'; methods scanned in mode iso: naive"
    )
    with pytest.raises(ConfigError, match="error mode must be one of iso, cum, got 'both'"):
        exclude_by_thresholds(TABLE, mode="both")
    with pytest.raises(ConfigError, match="methods scanned in mode cum: none"):
        exclude_by_thresholds(TABLE, mode="cum")


def test_threshold_validation() -> None:
    assert Thresholds(max_rel_l1=1, min_sqnr_db=30).min_sqnr_db == 30.0
    with pytest.raises(ConfigError, match="max_rel_l1 must be >= 0"):
        Thresholds(max_rel_l1=-0.1)
    with pytest.raises(ConfigError, match="min_sqnr_db must be a finite number or None"):
        Thresholds(min_sqnr_db=math.nan)
    with pytest.raises(ConfigError, match="max_rel_l1 must be a finite number or None"):
        Thresholds(max_rel_l1="0.1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="nonfinite must be True or False"):
        Thresholds(nonfinite=1)  # type: ignore[arg-type]


def test_to_exclude_yaml_and_policy(tmp_path: Path) -> None:
    excluded = exclude_by_thresholds(TABLE, T)
    entries = list(excluded.values())
    assert entries[0] == ExcludeEntry(
        "backbone.conv2",
        "isolated relative L1 0.183 > 0.1",
        {"iso_naive_rel_l1": 0.183, "iso_naive_sqnr_db": 25.0, "iso_naive_nonfinite": 0.0},
    )
    write_exclude(excluded, tmp_path / "a.yaml", spec="W8A8")
    write_exclude(entries, tmp_path / "b.yaml", spec="W8A8")
    assert (tmp_path / "a.yaml").read_bytes() == (tmp_path / "b.yaml").read_bytes()
    assert load_exclude_entries(tmp_path / "a.yaml", layers=list(TABLE.index)) == entries
    policy = exclusion_policy(entries, spec="W8A8")
    assert policy.excluded(TABLE.index) == list(excluded)
    assert parse_policy(dump_policy(policy), layers=list(TABLE.index)) == policy
