"""Stage 3, policy v2: the FP budget where quantization costs the most output error, each other layer's
least-output-error candidate, and nothing believed before it is measured.

1. Safety net (does not count against the budget): the user's exclusion list, layers whose isolated output
   is non-finite, and, for layers no output measurement reached, the isolated thresholds of policy v1.
2. The FP layers (`choose_fp`: a knapsack under --max-fp-layers / --max-fp-macs) by each layer's naive
   output error, then per other layer the best candidate (`sensitivity.policy.output.best_options`). Why
   naive: an FP slot removes the layer's naive error for certain, while another candidate's gain is a
   prediction from the held-out batches; spending the slots on the layers whose best candidate still
   costs the most bets them on those gains carrying over to new data. On the CenterPoint-shaped model
   (two held-out frames, test frames from other scenes) that bet lost: 1.23x the oracle's test error, 0.79x
   this way (`benchmarks/output_sensitivity.py`; benchmarks/README.md).
3. The boundary of that choice is measured exactly: the layers ranked just inside and just outside the
   budget are each quantized alone (naive) over the held-out batches, and the FP set is chosen again with
   those exact errors (greedy correction on measured error: a layer the first-order prediction over- or
   under-rated is swapped). The exclusion list (exclude.yaml) is the same FP set.
4. The policy is verified by a quantized pass (non-finite outputs repaired by putting the worst upstream
   layer in FP, step by step); candidates other than plain naive must then beat plain naive on the
   measured output error of the whole model, or they are reverted.
A model whose layers together predict a negligible output error (`NEGLIGIBLE_ERROR`) stays all naive.
The curve "output error vs layers kept in FP" keeps the predicted values for every step and the measured
ones where a pass measured them.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, replace

import pandas as pd

from sensitivity.capture.pieces import kept_budget_mb
from sensitivity.methods.base import Method
from sensitivity.pipeline.calibration import Calibration
from sensitivity.pipeline.decide import USER_LISTED, Decision
from sensitivity.pipeline.measure import Measurement
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.pipeline.sensitivity import OutputSensitivity
from sensitivity.pipeline.verify import Verifier, isolated_badness, repair_reason
from sensitivity.policy import ExcludeEntry, Rule, Thresholds, exclude_by_thresholds
from sensitivity.policy.output import NEGLIGIBLE_ERROR, LayerOption, best_options, choose_fp, negligible
from sensitivity.quant.build import LayerQuant, same_configs

__all__ = ["CurvePoint", "decide_by_outputs"]


@dataclass(frozen=True)
class CurvePoint:
    """Output error with the `fp_layers` first layers of the FP ranking kept in FP (the last one `layer`)
    and every other layer naive; the last point may instead be the policy (`policy`: the same FP layers,
    each other layer with its chosen method)."""

    fp_layers: int
    layer: str
    predicted: float
    measured: float = math.nan
    policy: bool = False


def _setting(
    meas: Measurement, cal: Calibration, sens: OutputSensitivity, name: str, key: str, opts: ScanOptions
) -> LayerQuant:
    """The layer quantized as candidate `key`; naive is the fitting batches' setting the probes scored
    (a loaded checkpoint's amax where there is one)."""
    if key == "naive":
        return sens.fit_configs[name]
    return Method.from_key(key, opts.sq_mode).fit(meas.qlayers[name], cal.observers[name])


def _safety_net(
    cal: Calibration, meas: Measurement, sens: OutputSensitivity, opts: ScanOptions
) -> dict[str, ExcludeEntry]:
    table, names = meas.table, cal.names
    net = {n: e for n, e in exclude_by_thresholds(table, Thresholds(None, None, True)).items()}
    unmeasured = [n for n in names if math.isnan(sens.best(n)[1])]
    if unmeasured:
        limits = exclude_by_thresholds(table.loc[unmeasured], opts.thresholds)
        for n, e in limits.items():
            net.setdefault(n, replace(e, reason=f"{e.reason} (no output measurement reached this layer)"))
    for n in opts.user_fp(names):
        net.setdefault(n, ExcludeEntry(n, USER_LISTED))
    return {n: net[n] for n in names if n in net}


class _Exact:
    """Exact alone errors, each measured once: (layer, candidate key) -> relative output MSE."""

    def __init__(
        self, cal: Calibration, meas: Measurement, sens: OutputSensitivity, opts: ScanOptions
    ) -> None:
        self.cal, self.meas, self.sens, self.opts = cal, meas, sens, opts
        self.values: dict[tuple[str, str], float] = {}
        self.keep_mb = kept_budget_mb(cal.prep.layers, opts.stored_activation_mb, meas.probes)

    def expect(self, wanted: list[tuple[str, str]]) -> None:
        """Before measuring `wanted`: from two new measurements on, keep the FP layer outputs (one FP
        forward) so that each one skips the FP layers its quantized layer does not reach."""
        new = [k for k in wanted if k not in self.values]
        if len(new) >= 2 and self.sens.reference is not None:
            self.sens.reference.keep_layer_outputs(self.cal.prep.model, self.keep_mb)

    def __call__(self, layer: str, key: str) -> float:
        if (layer, key) not in self.values:
            assert self.sens.reference is not None
            setting = _setting(self.meas, self.cal, self.sens, layer, key, self.opts)
            self.values[(layer, key)] = self.sens.reference.alone(
                self.meas.qmodel, self.cal.names, layer, setting
            )
        return self.values[(layer, key)]


@dataclass
class _Selection:
    """One FP choice: the options it was made on (exact where measured), the FP layers, the ranking."""

    options: dict[str, LayerOption]
    fp: list[str]
    ranked: list[str]
    exact: dict[str, float]

    def blown(self) -> dict[str, ExcludeEntry]:
        """Layers whose option, quantized alone, measured non-finite outputs: FP outside the budget."""
        return {
            n: ExcludeEntry(
                n,
                "quantized alone it turns the model's outputs non-finite (measured on the held-out batches)",
                {f"out_{self.options[n].key}_exact_err": e},
            )
            for n, e in self.exact.items()
            if not math.isfinite(e)
        }


def _select(
    options: dict[str, LayerOption], free: list[str], budget: int, exact: _Exact, progress: PhaseProgress,
    label: str,
) -> _Selection:  # fmt: skip
    """The FP layers for `options`: ranked by prediction, the layers around the budget's edge measured
    exactly (each alone, with its option), then chosen again on those measurements."""
    ranked = sorted(free, key=lambda n: -_err(options[n]))
    width = max(1, math.ceil(budget / 4))
    window = ranked[max(0, budget - width) : budget + width] if budget else []
    blind = {n for n in free if exact.sens.source.get(n, "").startswith("exact")}
    window = [n for n in window if n not in blind or options[n].key != "naive"]
    measured: dict[str, float] = {}
    exact.expect([(n, options[n].key) for n in window])
    with progress.phase(f"exact check ({label})", len(window)) as advance:
        for n in window:
            measured[n] = exact(n, options[n].key)
            advance()
    options = {**options, **{n: replace(options[n], error=e) for n, e in measured.items()}}
    ranked = sorted(free, key=lambda n: -_err(options[n]))
    finite = [n for n in free if not (n in measured and not math.isfinite(measured[n]))]
    return _Selection(options, choose_fp(options, finite, budget, exact.opts.max_fp_macs), ranked, measured)


def _options(
    table: pd.DataFrame, opts: ScanOptions, free: list[str], net: dict[str, ExcludeEntry]
) -> tuple[dict[str, LayerOption], int, str]:
    """Each layer's best candidate, the FP budget, and the reason naive layers get: on a model whose
    predicted output error is negligible, every layer stays naive (no FP slot, no other candidate)."""
    budget = opts.fp_layer_budget(len(free) + len(net))
    calm = negligible(table)
    if calm is not None:
        plain = {n: replace(o, key="naive", error=o.naive_error) for n, o in best_options(table).items()}
        return plain, 0, (
            f"the model's predicted output error, every layer naive, is negligible ({calm:.2g} < "
            f"{NEGLIGIBLE_ERROR:g}): nothing to repair"
        )  # fmt: skip
    return best_options(table, opts.sq_mode), budget, ""


def _rules(
    names: list[str], sel: _Selection, net: dict[str, ExcludeEntry], budget: int, mode: str, note: str = ""
) -> dict[str, Rule]:
    """One rule per layer: the safety net's FP, the selection's FP (with its measured or predicted output
    error in the reason), else the layer's option."""
    rank = {n: i for i, n in enumerate(sel.ranked)}
    rules: dict[str, Rule] = {}
    for n in names:
        o = sel.options[n]
        metrics = {"out_naive_err": o.naive_error} if math.isfinite(o.naive_error) else {}
        if o.key != "naive" and math.isfinite(o.error):
            metrics[f"out_{o.key}_err"] = o.error
        if n in sel.exact:
            metrics["out_exact_err"] = sel.exact[n]
        if n in net:
            rules[n] = Rule(n, "fp", reason=net[n].reason, metrics={**net[n].metrics, **metrics})
        elif n in sel.fp:
            how = "measured" if n in sel.exact else "predicted"
            what = "naive" if o.key == "naive" else f"at best ({o.key})"
            reason = (
                f"{how} output error {what} {o.error:.3g} alone (rank {rank[n] + 1} of {len(names)}): kept in "
                f"FP within the budget of {budget} layers"
            )
            rules[n] = Rule(n, "fp", reason=reason, metrics=metrics)
        else:
            fields = dict(Method.from_key(o.key, mode).rule_fields())
            reason = note
            if o.key != "naive":
                reason = f"least predicted output error: {o.key} {o.error:.3g} vs naive {o.naive_error:.3g}"
            rules[n] = Rule(n, reason=reason, metrics=metrics, **fields)
    return rules


def decide_by_outputs(
    cal: Calibration, meas: Measurement, sens: OutputSensitivity, opts: ScanOptions, progress: PhaseProgress,
    timings: dict[str, float],
) -> tuple[Decision, Verifier, list[CurvePoint]]:  # fmt: skip
    """Policy v2 (every candidate) and the exclusion list (naive only, what exclude.yaml holds), each with
    the FP budget spent where it removes the most output error, both verified."""
    t = time.perf_counter()
    names, table = cal.names, meas.table
    verifier = Verifier(
        cal.prep.model, meas.qmodel, cal.prep.layers, cal.held_local, opts, progress, meas.reference,
        probes=meas.probes,
    )  # fmt: skip
    net = _safety_net(cal, meas, sens, opts)
    free = [n for n in names if n not in net]
    exact = _Exact(cal, meas, sens, opts)
    best, budget, note = _options(table, opts, free, net)
    naive = {n: replace(o, key="naive", error=o.naive_error) for n, o in best.items()}
    # the FP slots go where quantization itself costs the most (its gain is certain); the other layers
    # then get their best candidate, whose predicted gain the held-out batches may overstate
    exc = _select(naive, free, budget, exact, progress, "FP layers")
    if not note:
        best = best_options(table, opts.sq_mode, fp=set(exc.fp) | set(net))
    pol = _Selection({**best, **{n: exc.options[n] for n in exc.fp}}, exc.fp, exc.ranked, exc.exact)
    rules = _rules(names, pol, {**net, **pol.blown()}, budget, opts.sq_mode, note)
    table["out_best"] = [best[n].key for n in names]
    table["out_exact_err"] = [exact.values.get((n, "naive"), math.nan) for n in names]
    configs = {
        n: LayerQuant("fp") if rules[n].method == "fp" else _setting(meas, cal, sens, n, best[n].key, opts)
        for n in names
    }
    badness, repair = (lambda n: isolated_badness(table, n)), functools.partial(repair_reason, table)
    pol_check, moved = verifier.repaired(configs, "policy", badness, repair)
    for n, entry in moved.items():
        rules[n] = Rule(n, "fp", reason=entry.reason, metrics=entry.metrics)
    ex_rules = _rules(names, exc, {**net, **exc.blown()}, budget, opts.sq_mode, note)
    ex_configs = {n: LayerQuant("fp") if ex_rules[n].method == "fp" else sens.fit_configs[n] for n in names}
    if same_configs(ex_configs, configs):  # the policy chose nothing but naive and the same FP layers
        ex_check, ex_moved = pol_check, {}
    else:
        ex_check, ex_moved = verifier.repaired(ex_configs, "exclusion", badness, repair, outputs_only=True)
    # the policy with plain naive for its other candidates is the exclusion (unless a repair moved a layer)
    measured = [] if ex_moved else [(ex_configs, ex_check.out_rel_mse())]
    pol_check, rules = _naive_if_better(meas, sens, rules, configs, pol_check, verifier, measured)
    excluded = {
        n: ExcludeEntry(n, r.reason, dict(r.metrics)) for n, r in ex_rules.items() if r.method == "fp"
    }
    excluded.update(ex_moved)
    excluded = {n: excluded[n] for n in names if n in excluded}
    fp_ranked = [n for n in exc.ranked if n in exc.fp]
    base = [n for n in names if n not in net and n not in pol.blown()]  # the rest is FP at every step
    policy_pred = sum(max(_err(pol.options[n]), 0.0) for n in base if n not in exc.fp)
    ex_measured = math.nan if ex_moved else ex_check.out_rel_mse()
    # all naive was measured by the measure stage's quantized pass (with the safety net's layers quantized too)
    all_naive = (
        meas.result.out_rel_mse() if sens.reference is not None and len(base) == len(names) else math.nan
    )
    measured = (all_naive, ex_measured, pol_check.out_rel_mse())
    curve = _curve({n: exc.options[n] for n in base}, fp_ranked, policy_pred, measured)
    timings["verify_s"] = time.perf_counter() - t
    return Decision(rules, excluded, ex_check, pol_check), verifier, curve


def _err(option: LayerOption) -> float:
    return -1.0 if math.isnan(option.error) else option.error


def _naive_if_better(meas, sens, rules, configs, pol_check, verifier, measured):  # type: ignore[no-untyped-def]
    """Candidates other than plain naive stay only if the whole model measures better with them. `measured`:
    configurations already measured ((configs, relative output MSE) each), reused where one is the same."""
    fancy = [
        n for n, r in rules.items() if r.method == "smoothquant" or (r.method == "naive" and r.calibrator)
    ]
    if not fancy or sens.reference is None or not math.isfinite(pol_check.out_rel_mse()):
        return pol_check, rules
    plain = dict(configs)
    for n in fancy:
        plain[n] = sens.fit_configs[n]
    known = [err for cfg, err in measured if same_configs(cfg, plain)]
    measured_plain = known[0] if known else sens.reference.measure(meas.qmodel, plain)
    if not measured_plain < pol_check.out_rel_mse():
        return pol_check, rules
    for n in fancy:
        rules[n] = Rule(
            n, "naive", reason=f"measured: plain naive ranges gave the model less output error "
            f"({measured_plain:.3g} vs {pol_check.out_rel_mse():.3g})", metrics=rules[n].metrics,
        )  # fmt: skip
    configs.update(plain)
    return verifier.run(configs, "policy"), rules


def _curve(
    naive: dict[str, LayerOption],
    fp_ranked: list[str],
    policy_pred: float,
    measured: tuple[float, float, float],
) -> list[CurvePoint]:
    """Predicted output error as the FP layers are added one by one to the model with every other layer
    naive (`naive`: the layers quantized at the start; each step the sum of the remaining layers' naive
    errors), then the policy's methods on the other layers. Measured only where a pass the scan needed
    anyway ran (`measured`: all naive, the exclusion, the policy; NaN where none matches): no pass of its
    own (on the real OpenPCDet CenterPoint a pass is 3.4 s of a 72 s scan)."""
    if not fp_ranked:
        return []
    start, ex_measured, policy_measured = measured
    total = sum(max(_err(o), 0.0) for o in naive.values())
    points = [CurvePoint(0, "", total, start)]
    for k, n in enumerate(fp_ranked, 1):
        total -= max(_err(naive[n]), 0.0)
        points.append(CurvePoint(k, n, total, ex_measured if k == len(fp_ranked) else math.nan))
    if not (math.isfinite(ex_measured) and ex_measured == policy_measured):  # the policy is not the exclusion
        points.append(CurvePoint(len(fp_ranked), "", policy_pred, policy_measured, policy=True))
    return points
