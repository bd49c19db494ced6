"""`scan()`: from an FP model and calibration batches to `ScanData`, as a short chain of stages.

prepare + calibrate on the fitting batches -> one pass over the held-out batches (isolated errors of every
candidate in the FP pass's hooks, cumulative errors in the quantized pass) -> the LayerTable -> decisions,
each verified by a quantized pass -> the QuantState (amax and factors refitted on all batches) -> the
user's metric and exclusion budget -> the result. Decisions are scored on held-out batches, so a choice
that only fits the calibration data loses.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from sensitivity.data import check_batch
from sensitivity.errors import CalibrationDataError
from sensitivity.io.batches import Batch
from sensitivity.metrics import ErrorStats
from sensitivity.pipeline.calibration import Calibration, calibrate_stage
from sensitivity.pipeline.decide import Decision, decide_stage
from sensitivity.pipeline.decide_output import CurvePoint, decide_by_outputs
from sensitivity.pipeline.evaluate import Evaluation, eval_fp, evaluate_stage
from sensitivity.pipeline.measure import Measurement, measure_stage
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.pipeline.result import ScanData, comparison_tables, output_warning, scan_warnings
from sensitivity.pipeline.sensitivity import output_stage
from sensitivity.pipeline.state import example_input, quant_state
from sensitivity.pipeline.verify import Verifier
from sensitivity.policy import ExcludeEntry, Policy, Rule
from sensitivity.quant.registry import run_context
from sensitivity.quant.state import QuantState

__all__ = ["scan"]


def scan(
    model: nn.Module,
    batches: Sequence[Batch],
    options: ScanOptions | None = None,
    *,
    model_name: str = "model",
    progress: PhaseProgress | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume_file: Path | None = None,
    resume: bool = False,
) -> ScanData:
    """Measure every target layer's isolated and cumulative quantization error; decide FP / naive /
    SmoothQuant per layer; verify the decisions with quantized passes on held-out batches.

    `evaluate(model) -> {metric: value}` (higher is better, e.g. top-1 or mAP) scores FP, all-naive,
    naive+exclusion and the policy; with `options.exclude_budget` the next most sensitive layer is put in
    FP, one evaluation per step, until the metric is within the budget of FP.

    `resume_file`: where the calibration is checkpointed once done (removed by the caller when the
    report is written); with `resume=True` a matching checkpoint there replaces the calibration pass.
    """
    opts = options or ScanOptions()
    progress = progress or PhaseProgress()
    batches = list(batches)
    if not batches:
        raise CalibrationDataError("the calibration set is empty: give at least one batch")
    for index, batch in enumerate(batches):
        check_batch(batch, index, "the given data")
    torch.manual_seed(opts.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    with run_context(model):
        fp_eval: dict[str, float] = {}

        def on_prepared(fp: nn.Module) -> None:
            if evaluate is not None:
                fp_eval.update(eval_fp(evaluate, fp))

        cal = calibrate_stage(model, batches, opts, progress, timings, on_prepared, resume_file, resume)
        meas = measure_stage(cal, opts, progress, timings)
        sens = output_stage(cal, meas, opts, progress, timings)
        curve: list[CurvePoint] = []
        if opts.policy == "output" and sens.probes:
            decision, verifier, curve = decide_by_outputs(cal, meas, sens, opts, progress, timings)
        else:
            decision, verifier = decide_stage(cal, meas, opts, progress, timings)
        if meas.reference is not None:  # kept FP layer outputs served the checks; the user's metric and
            meas.reference.drop_layer_outputs()  # what follows need their memory more
        state = _state(cal, meas, decision, opts)
        evaluation = Evaluation({})
        if evaluate is not None:
            t = time.perf_counter()
            evaluation = evaluate_stage(
                evaluate, fp_eval, meas.qmodel, state, decision.rules, list(decision.excluded), meas.table, opts,
                progress, ranking=_output_ranking(meas.table, decision.rules),
            )  # fmt: skip
            if evaluation.steps:
                decision, state = _after_budget(evaluation, decision, cal, meas, verifier, opts)
            timings["eval_s"] = time.perf_counter() - t
    data = _result(cal, meas, decision, state, evaluation, opts, model_name)
    data.fp_curve = curve
    if curve:
        fp_count = sum(1 for r in decision.rules.values() if r.method == "fp")
        warning = output_warning(
            decision.pol_check.out_rel_mse(), fp_count, opts.fp_layer_budget(len(cal.names))
        )
        if warning:
            data.warnings.append(warning)
    timings["total_s"] = time.perf_counter() - t0
    data.timings = timings
    return data


def _output_ranking(table: pd.DataFrame, rules: dict[str, Rule]) -> list[str]:
    """Quantized layers by their output error (exact where measured, else predicted), largest first; empty
    without output-referred columns (then the budget ranks by isolated error)."""
    if "out_naive_err" not in table.columns:
        return []

    def error(n: str) -> float:
        exact = float(table.loc[n, "out_exact_err"]) if "out_exact_err" in table.columns else math.nan
        if math.isfinite(exact):
            return exact
        key = table.loc[n, "out_best"] if "out_best" in table.columns else "naive"
        col = f"out_{key}_err" if f"out_{key}_err" in table.columns else "out_naive_err"
        value = float(table.loc[n, col])
        return value if not math.isnan(value) else -1.0

    return sorted((n for n, r in rules.items() if r.method != "fp"), key=error, reverse=True)


def _state(cal: Calibration, meas: Measurement, decision: Decision, opts: ScanOptions) -> QuantState:
    """The final numbers (all batches) for the decided methods."""
    sq_fold = {n: site.producer for n, site in meas.fold_sites.items() if site.producer}
    return quant_state(
        meas.qlayers, cal.observers, decision.rules, opts.spec, folded=cal.prep.folded, sq_fold=sq_fold,
        example=example_input(cal.batches[0]), fixed=cal.fixed,
    )  # fmt: skip


def _after_budget(
    evaluation: Evaluation, decision: Decision, cal: Calibration, meas: Measurement, verifier: Verifier,
    opts: ScanOptions,
) -> tuple[Decision, QuantState]:  # fmt: skip
    """The budget moved layers to FP: their rules say why, exclude.yaml lists them too, and both changed
    configurations are verified again."""
    key, fp_value = evaluation.key, evaluation.evals["fp"][evaluation.key]
    rules = dict(decision.rules)
    excluded = dict(decision.excluded)
    for step in evaluation.steps:
        old = rules[step.layer]
        reason = f"exclusion budget: {key} below FP {fp_value:.4g} - {opts.exclude_budget:g}"
        rules[step.layer] = Rule(
            match=step.layer,
            method="fp",
            reason=reason,
            metrics={**old.metrics, f"eval_{key}_before": step.before},
        )
        excluded[step.layer] = ExcludeEntry(step.layer, reason, dict(rules[step.layer].metrics))
    excluded = {n: excluded[n] for n in cal.names if n in excluded}
    decision = Decision(rules, excluded, decision.ex_check, decision.pol_check)
    state = _state(cal, meas, decision, opts)
    decision.pol_check = verifier.run(state.configs("policy"), "policy")
    decision.ex_check = verifier.run(state.configs("exclusion", excluded), "exclusion", outputs_only=True)
    return decision, state


def _result(
    cal: Calibration, meas: Measurement, decision: Decision, state: QuantState, evaluation: Evaluation,
    opts: ScanOptions, model_name: str,
) -> ScanData:  # fmt: skip
    names, table, rules = cal.names, meas.table, decision.rules
    for n in names:
        for key, value in decision.pol_check.cum.get(n, ErrorStats()).metrics().items():
            table.loc[n, f"cum_policy_{key}"] = value
    table["decision"] = [rules[n].method for n in names]
    table["alpha"] = [rules[n].alpha if rules[n].alpha is not None else math.nan for n in names]
    table["calibrator"] = [
        (rules[n].calibrator or opts.spec.calibrator_choice) if rules[n].method == "naive" else ""
        for n in names
    ]
    table["reason"] = [rules[n].reason for n in names]
    if evaluation.steps:
        step_of = {s.layer: s for s in evaluation.steps}
        table["budget_step"] = [step_of[n].step if n in step_of else math.nan for n in names]
        table["eval_after_exclusion"] = [step_of[n].after if n in step_of else math.nan for n in names]
    checks = {"naive": meas.result, "naive+exclusion": decision.ex_check, "policy": decision.pol_check}
    fp_layers = {"naive": 0, "naive+exclusion": len(decision.excluded),
                 "policy": sum(1 for r in rules.values() if r.method == "fp")}  # fmt: skip
    sq_layers = sum(1 for r in rules.values() if r.method == "smoothquant")
    comparison, per_output = comparison_tables(checks, fp_layers, len(names), sq_layers, evaluation.evals)
    policy_rules = [rules[n] for n in names if rules[n].method != "naive" or rules[n].calibrator]
    shared = {rules[n].reason for n in names if rules[n].method == "naive" and not rules[n].calibrator}
    why = f": {next(iter(shared))}" if len(shared) == 1 and "" not in shared else ""
    policy_rules.append(
        Rule(match="**", method="naive", reason=f"default: every other layer {opts.spec.name}{why}")
    )
    return ScanData(
        model_name=model_name,
        options=opts,
        layers=cal.prep.layers,
        table=table,
        excluded=decision.excluded,
        policy=Policy(rules=tuple(policy_rules), spec=opts.spec.name),
        comparison=comparison,
        output_comparison=per_output,
        first_nonfinite=meas.result.first_nonfinite,
        policy_first_nonfinite=decision.pol_check.first_nonfinite,
        quant_state=state,
        calibration={
            "batches": len(cal.batches),
            "fit_batches": len(cal.fit),
            "heldout_batches": len(cal.held),
        },
        timings={},
        observers=cal.observers,
        histograms=meas.histograms,
        sweeps=meas.sweeps,
        folded_bn=cal.prep.folded,
        fp_model=cal.prep.model,
        unscanned=cal.prep.unscanned,
        warnings=scan_warnings(cal.prep.unscanned, cal.held, cal.batches) + evaluation.notes,
    )
