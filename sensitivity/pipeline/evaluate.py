"""The user's metric (`--eval`): FP first of all, then all-naive, naive+exclusion and the policy, then the
exclusion budget (`sensitivity.policy.budget`) with the metric measured after each layer moves to FP."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import nn

from sensitivity import distributed as D
from sensitivity.errors import SensitivityError, SpecError
from sensitivity.errors import describe_exception as _exc
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.policy import Rule
from sensitivity.policy.budget import BudgetStep, greedy_exclusion
from sensitivity.quant.build import configure_layers
from sensitivity.quant.state import QuantState

__all__ = ["Evaluation", "eval_fp", "evaluate_stage", "run_eval"]

Evaluate = Callable[[nn.Module], dict[str, float]]


def run_eval(evaluate: Evaluate, model: nn.Module) -> dict[str, float]:
    """The user's metric on `model` as {name: float}; rank 0 evaluates once and every rank gets the result
    (a failure reaches every rank, so none waits forever)."""
    values: Any = None
    if D.is_main():
        try:
            values = evaluate(model)
        except SensitivityError as exc:
            values = exc
        except Exception as exc:
            values = SpecError(f"--eval function raised {_exc(exc)}")
    values = D.broadcast(values)
    if isinstance(values, SensitivityError):
        raise values
    if not isinstance(values, dict) or not values:
        raise SpecError("--eval function must return a non-empty dict of metric name -> number")
    try:
        return {str(k): float(v) for k, v in values.items()}
    except (TypeError, ValueError) as exc:
        raise SpecError(f"--eval function returned a non-numeric metric: {values!r}") from exc


def eval_fp(evaluate: Evaluate, fp: nn.Module) -> dict[str, float]:
    """The metric of the FP model (measured first: a broken --eval fails in seconds, not after the scan)."""
    values = run_eval(evaluate, fp)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        k, v = next(iter(bad.items()))
        raise SpecError(
            f"--eval function returned {k}={v} for the FP model: every metric must be a finite number"
        )
    return values


@dataclass
class Evaluation:
    evals: dict[str, dict[str, float]]
    steps: list[BudgetStep] = field(default_factory=list)
    key: str = ""
    notes: list[str] = field(default_factory=list)


def _order(rules: dict[str, Rule], table: pd.DataFrame) -> list[str]:
    """Layers still quantized, most sensitive first (isolated relative L1 of their method; NaN first)."""

    def sensitivity(n: str) -> float:
        col = "iso_sq_rel_l1" if rules[n].method == "smoothquant" else "iso_naive_rel_l1"
        v = float(table.loc[n, col]) if col in table.columns else math.nan
        return v if math.isfinite(v) else math.inf

    return sorted((n for n, r in rules.items() if r.method != "fp"), key=sensitivity, reverse=True)


def evaluate_stage(
    evaluate: Evaluate,
    fp_eval: dict[str, float],
    qmodel: nn.Module,
    state: QuantState,
    rules: dict[str, Rule],
    excluded: list[str],
    table: pd.DataFrame,
    opts: ScanOptions,
    progress: PhaseProgress,
    ranking: list[str] | None = None,
) -> Evaluation:
    """The metric per configuration, then (with a budget) the steps that moved layers to FP: in the order
    of `ranking` (the output-referred one: fewer evaluations) where given, else by isolated error."""

    def run(configs: dict[str, Any]) -> dict[str, float]:
        configure_layers(qmodel, configs)
        return run_eval(evaluate, qmodel)

    out = Evaluation({"fp": fp_eval})
    with progress.phase("evaluate", 3) as advance:
        for label, config in (("naive", "naive"), ("naive+exclusion", "exclusion"), ("policy", "policy")):
            out.evals[label] = run(state.configs(config, excluded))
            advance()
    if opts.exclude_budget is None:
        return out
    key = out.key = opts.eval_metric or next(iter(fp_eval))
    if key not in fp_eval:
        raise SpecError(f"--eval-metric {key!r} is not among the metrics returned: {', '.join(fp_eval)}")
    target = fp_eval[key] - opts.exclude_budget
    order = _order(rules, table)
    if ranking:
        ranked = [n for n in dict.fromkeys(ranking) if n in rules and rules[n].method != "fp"]
        order = ranked + [n for n in order if n not in set(ranked)]
    with progress.phase("exclusion budget", len(order)) as advance:

        def metric(fp_layers: list[str]) -> float:
            value = run(state.with_fp(fp_layers).configs("policy"))[key]
            advance()
            return value

        out.steps = greedy_exclusion(order, metric, out.evals["policy"][key], target)
    if out.steps:
        final = state.with_fp([s.layer for s in out.steps])
        out.evals["policy"] = run(final.configs("policy"))
    _say_what_went_wrong(out, target, opts)
    return out


def _say_what_went_wrong(out: Evaluation, target: float, opts: ScanOptions) -> None:
    key = out.key
    broken = [c for c in ("naive", "naive+exclusion", "policy") if not math.isfinite(out.evals[c][key])]
    broken += [f"budget step {s.step}" for s in out.steps if not math.isfinite(s.after)]
    if broken:
        out.notes.append(
            f"--eval returned a non-finite {key} for {', '.join(broken)} (a broken quantized model: counted as "
            "failing the budget)"
        )
    current = out.steps[-1].after if out.steps else out.evals["policy"][key]
    if not current >= target:
        out.notes.append(
            f"the exclusion budget was not reached: {key} {current:.4g} with {len(out.steps)} more layers in FP, "
            f"target {target:.4g} (FP {out.evals['fp'][key]:.4g} - {opts.exclude_budget:g})"
        )
