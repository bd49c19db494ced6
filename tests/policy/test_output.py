"""Policy v2's pure parts: the best candidate per layer (with its margin) and the FP knapsack."""

from __future__ import annotations

import itertools
import math
import random

import pandas as pd
import pytest

from sensitivity.policy.output import (
    FP_FLOOR,
    NEGLIGIBLE_ERROR,
    OUTPUT_MARGIN,
    LayerOption,
    best_options,
    choose_fp,
    negligible,
    selectable,
)


def _table(rows: dict[str, dict[str, float]]) -> pd.DataFrame:
    t = pd.DataFrame.from_dict(rows, orient="index")
    t.index.name = "layer"
    return t


def test_a_candidate_must_beat_naive_by_the_margin() -> None:
    t = _table(
        {
            "a": {"out_naive_err": 1.0, "out_naive_p99.99_err": 1.0 - OUTPUT_MARGIN / 2, "macs": 10},
            "b": {
                "out_naive_err": 1.0,
                "out_naive_p99.99_err": 0.5,
                "out_sq_channel_0.5_err": 0.3,
                "macs": 10,
            },
            "c": {"out_naive_err": 1.0, "out_unsigned_err": 0.01, "out_sq_im2col_0.5_err": 0.01, "macs": 10},
            "d": {"out_naive_err": math.nan, "macs": 10},
        }
    )
    best = best_options(t)
    assert best["a"].key == "naive" and best["a"].error == 1.0
    assert best["b"].key == "sq_channel_0.5" and best["b"].error == 0.3
    assert best["c"].key == "naive"  # the other sign and research im2col are never picked
    assert best["d"].key == "naive" and math.isnan(best["d"].error)
    assert not selectable("unsigned", "static") and not selectable("sq_im2col_0.5", "static")


def test_savings_count_against_what_the_quantized_layers_leave() -> None:
    """`big` dominates the total but goes to FP: `small`'s SmoothQuant saves under 1 % of the whole model's
    least error, yet most of what the layers left quantized keep, so it is worth it once `big` is out."""
    t = _table(
        {
            "big": {"out_naive_err": 1.0, "out_sq_channel_0.5_err": 0.9, "macs": 1},
            "small": {"out_naive_err": 0.012, "out_sq_channel_0.5_err": 0.004, "macs": 1},
            "rest": {"out_naive_err": 0.01, "macs": 1},
        }
    )
    saving, least_total = 0.012 - 0.004, 0.9 + 0.004 + 0.01
    assert saving < FP_FLOOR * least_total
    assert best_options(t)["small"].key == "naive"
    assert best_options(t, fp={"big"})["small"].key == "sq_channel_0.5"


@pytest.mark.parametrize(
    ("errors", "calm"),
    [
        ([1e-6, 2e-6, math.nan], True),  # a layer nothing reached does not count
        ([NEGLIGIBLE_ERROR / 2, NEGLIGIBLE_ERROR / 2], False),  # the sum, not each layer
        ([1e-6, math.inf], False),  # a non-finite prediction is never negligible
        ([math.nan, math.nan], False),  # nothing predicted: nothing to say
    ],
)
def test_negligible_is_the_sum_of_the_layers_predictions(errors: list[float], calm: bool) -> None:
    t = _table({f"l{i}": {"out_naive_err": e} for i, e in enumerate(errors)})
    assert (negligible(t) is not None) == calm
    assert negligible(_table({"l0": {"iso_naive_rel_l1": 0.1}})) is None  # no output scores at all


def _opts(values: list[float], macs: list[int]) -> dict[str, LayerOption]:
    return {
        f"l{i}": LayerOption(f"l{i}", "naive", v, v, m)
        for i, (v, m) in enumerate(zip(values, macs, strict=True))
    }


def test_a_layer_budget_takes_the_largest_errors_above_the_floor() -> None:
    opts = _opts([5.0, 1.0, 3.0, 0.001, math.inf], [1, 1, 1, 1, 1])
    assert choose_fp(opts, list(opts), 2) == ["l4", "l0"]  # a non-finite prediction first
    assert choose_fp(opts, ["l1", "l3"], 5) == ["l1"]  # l3 is below 1 % of the total
    assert choose_fp(opts, list(opts), 0) == []


@pytest.mark.parametrize("seed", range(40))
def test_the_mac_knapsack_is_optimal(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 7)
    opts = _opts([rng.random() for _ in range(n)], [rng.randint(1, 100) for _ in range(n)])
    count, share = rng.randint(0, n), rng.random()
    got = choose_fp(opts, list(opts), count, share, floor=0.0)
    total = sum(o.macs for o in opts.values())
    units = {k: math.ceil(1000 * o.macs / total) for k, o in opts.items()}
    best = max(
        sum(opts[k].error for k in combo)
        for r in range(count + 1)
        for combo in itertools.combinations(opts, r)
        if sum(units[k] for k in combo) <= int(1000 * share)
    )
    assert len(got) <= count and sum(units[k] for k in got) <= int(1000 * share)
    assert sum(opts[k].error for k in got) == pytest.approx(best)
