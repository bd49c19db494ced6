"""Stage 3: the decisions, each checked with a quantized pass on the held-out batches.

naive+exclusion (policy v1's exclusion list): thresholds on each layer's isolated naive error, plus the
user's list. The policy: FP / naive / SmoothQuant per layer from the same table. Either configuration
that still turns the model non-finite puts the worst layer upstream of the first NaN/Inf in FP, step by
step (`Verifier.repaired`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sensitivity.capture.passes import PassResult
from sensitivity.methods.base import Method
from sensitivity.pipeline.calibration import Calibration
from sensitivity.pipeline.measure import Measurement
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.pipeline.verify import Verifier, isolated_badness, repair_reason
from sensitivity.policy import ExcludeEntry, Rule, assign_methods, exclude_by_thresholds
from sensitivity.quant.build import LayerQuant

__all__ = ["Decision", "decide_stage"]

USER_LISTED = "listed in the user's exclusion file"


@dataclass
class Decision:
    """One rule per layer (method, reason, metrics), the naive+exclusion FP list, and their checks."""

    rules: dict[str, Rule]
    excluded: dict[str, ExcludeEntry]
    ex_check: PassResult
    pol_check: PassResult


def decide_stage(
    cal: Calibration, meas: Measurement, opts: ScanOptions, progress: PhaseProgress, timings: dict[str, float]
) -> tuple[Decision, Verifier]:
    names, table, result = cal.names, meas.table, meas.result
    # fit-batch statistics (what the held-out scoring measured) for the verification passes
    fit_configs = cal.fit_configs()
    user_fp = opts.user_fp(names)
    verifier = Verifier(
        cal.prep.model, meas.qmodel, cal.prep.layers, cal.held_local, opts, progress, meas.reference,
        probes=meas.probes,
    )  # fmt: skip

    def badness(name: str) -> float:
        return isolated_badness(table, name)

    def repair(name: str, where: str) -> ExcludeEntry:
        return repair_reason(table, name, where)

    t = time.perf_counter()
    excluded = dict(exclude_by_thresholds(table, opts.thresholds))
    for n in user_fp:
        excluded.setdefault(n, ExcludeEntry(n, USER_LISTED))
    ex_configs = {n: (LayerQuant("fp") if n in excluded else fit_configs[n]) for n in names}
    ex_check = result
    if excluded or result.first_nonfinite is not None:
        ex_check, moved = verifier.repaired(ex_configs, "exclusion", badness, repair, outputs_only=True)
        excluded.update(moved)
    excluded = {n: excluded[n] for n in names if n in excluded}

    rules = assign_methods(table, opts.thresholds, margin=opts.sq_margin, forced_fp=user_fp)
    pol_configs = {
        n: fit_configs[n] if rules[n].method == "naive" else _fit(meas, cal, rules[n], n) for n in names
    }
    pol_check = result
    if any(r.method != "naive" for r in rules.values()) or result.first_nonfinite is not None:
        pol_check, moved = verifier.repaired(pol_configs, "policy", badness, repair)
        for n, entry in moved.items():
            rules[n] = Rule(match=n, method="fp", reason=entry.reason, metrics=entry.metrics)
    timings["verify_s"] = time.perf_counter() - t
    return Decision(rules, excluded, ex_check, pol_check), verifier


def _fit(meas: Measurement, cal: Calibration, rule: Rule, name: str) -> LayerQuant:
    """The layer's setting under its rule's method, from its statistics now (fit and held-out batches)."""
    return Method.of(rule).fit(meas.qlayers[name], cal.observers[name])
