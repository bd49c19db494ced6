"""`scan()`: the whole analysis, from an FP model and calibration batches to a `ScanResult`.

Phases: prepare (deepcopy, fold BN, order layers) -> calibrate on the fitting batches -> per held-out batch
an FP pass (isolated errors in its hooks) and a quantized pass (cumulative errors) -> exclusion by
thresholds -> one quantized pass of naive+exclusion -> amax refit on all batches for the final model.
Decisions are scored on held-out batches so that a choice that only fits the calibration data loses.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import nn

from sensitivity.capture.observe import LayerObserver, RangeHistogram
from sensitivity.capture.passes import Candidate, PassResult, calibrate, compare_pass
from sensitivity.data import Batch, split_holdout
from sensitivity.errors import CalibrationDataError
from sensitivity.metrics import ErrorStats
from sensitivity.policy import Policy, Rule, Thresholds, exclude_by_thresholds, glob_match
from sensitivity.prepare import LayerInfo, prepare
from sensitivity.quant.build import ActQuant, build_quant_model, quant_layers, set_layer_enabled
from sensitivity.quant.quantizer import TensorQuantizer
from sensitivity.quant.spec import QuantSpec
from sensitivity.table import build_table

__all__ = ["PhaseProgress", "ScanOptions", "ScanResult", "scan"]

log = logging.getLogger(__name__)


class PhaseProgress:
    """Progress callbacks; the library reports phases, the CLI draws them (the library never prints)."""

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        yield lambda: None

    def note(self, message: str) -> None:
        log.info(message)


@dataclass(frozen=True)
class ScanOptions:
    spec: QuantSpec = field(default_factory=QuantSpec)
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    fold_bn: bool = True
    holdout: float = 0.25
    thresholds: Thresholds = field(default_factory=Thresholds)
    exclude: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    seed: int = 0
    max_nonfinite_repairs: int = 8


@dataclass
class ScanResult:
    """Everything a scan measured and decided; `save()` writes the report folder."""

    model_name: str
    options: ScanOptions
    layers: list[LayerInfo]
    table: pd.DataFrame
    excluded: dict[str, tuple[str, dict[str, float]]]
    policy: Policy
    comparison: pd.DataFrame
    first_nonfinite: str | None
    policy_first_nonfinite: str | None
    quant_state: dict[str, Any]
    calibration: dict[str, int]
    timings: dict[str, float]
    observers: dict[str, LayerObserver] = field(repr=False, default_factory=dict)
    histograms: dict[str, RangeHistogram] = field(repr=False, default_factory=dict)
    folded_bn: dict[str, str] = field(default_factory=dict)
    fp_model: nn.Module | None = field(repr=False, default=None)

    def quantized_model(self, exclusions: bool = True) -> nn.Module:
        """The scanned model quantized with the final amax (refitted on all batches); excluded layers in FP
        when `exclusions`. Built from the in-memory, BN-folded FP model this scan measured against."""
        if self.fp_model is None:
            raise ValueError("this ScanResult holds no model (it was loaded from disk)")
        acts = {
            n: ActQuant(s["input_amax"], bool(s["input_unsigned"]))
            for n, s in self.quant_state["layers"].items()
        }
        model = build_quant_model(self.fp_model, acts, self.spec)
        if exclusions:
            set_layer_enabled(model, self.excluded, False)
        return model

    @property
    def spec(self) -> QuantSpec:
        return self.options.spec

    def save(self, out_dir: str, overwrite: bool = False) -> Any:
        from sensitivity.output import write_scan

        return write_scan(self, out_dir, overwrite=overwrite)


def _comparison_row(name: str, stats: ErrorStats | None, excluded: int, n_layers: int) -> dict[str, Any]:
    row: dict[str, Any] = {"config": name, "quantized_layers": n_layers - excluded, "fp_layers": excluded}
    m = stats.metrics() if stats is not None else None
    for key in ("rel_l1", "sqnr_db", "cosine", "max_abs", "nonfinite"):
        if m is None:
            row[f"out_{key}"] = {"rel_l1": 0.0, "sqnr_db": math.inf, "cosine": 1.0}.get(key, 0.0)
        else:
            row[f"out_{key}"] = m[key]
    return row


def _alt_sign_candidate(qmod: Any, obs: LayerObserver, spec: QuantSpec) -> tuple[str, Candidate]:
    """The same layer with the other activation sign: what unsigned codes would gain (or cost)."""
    unsigned = not qmod.input_quantizer.unsigned
    alt = TensorQuantizer(spec.a_bits, axis=None, unsigned=unsigned)
    alt.set_amax(obs.amax(unsigned=unsigned))

    def run(args: tuple) -> Any:
        saved = qmod.input_quantizer
        qmod.input_quantizer = alt
        try:
            return qmod(*args)
        finally:
            qmod.input_quantizer = saved

    return ("unsigned" if unsigned else "signed"), run


def scan(
    model: nn.Module,
    batches: Sequence[Batch],
    options: ScanOptions | None = None,
    *,
    model_name: str = "model",
    progress: PhaseProgress | None = None,
) -> ScanResult:
    """Measure every target layer's isolated and cumulative quantization error and decide exclusions."""
    opts = options or ScanOptions()
    spec = opts.spec
    progress = progress or PhaseProgress()
    batches = list(batches)
    if not batches:
        raise CalibrationDataError("the calibration set is empty: give at least one batch")
    torch.manual_seed(opts.seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    with progress.phase("prepare", 1) as advance:
        prep = prepare(model, batches[0], only=list(opts.only), skip=list(opts.skip), fold_bn=opts.fold_bn)
        advance()
    fp = prep.model
    layers = prep.layers
    names = prep.names
    fit, held = split_holdout(batches, opts.holdout)
    fit_only = fit is not held and len(fit) + len(held) == len(batches)
    timings["prepare_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    with progress.phase("calibrate", len(fit)) as advance:
        observers = calibrate(fp, layers, fit, spec, progress=advance)
    timings["calibrate_s"] = time.perf_counter() - t

    acts = {n: ActQuant(observers[n].amax(), observers[n].unsigned()) for n in names}
    qmodel = build_quant_model(fp, acts, spec)
    qlayers = quant_layers(qmodel)
    candidates: dict[str, dict[str, Candidate]] = {}
    alt_names: set[str] = set()
    for n in names:
        qmod = qlayers[n]
        cands: dict[str, Candidate] = {"naive": (lambda args, _m=qmod: _m(*args))}
        if observers[n].nonnegative:
            alt_name, fn = _alt_sign_candidate(qmod, observers[n], spec)
            cands[alt_name] = fn
            alt_names.add(alt_name)
        candidates[n] = cands

    histograms = {n: RangeHistogram(min(observers[n].min_value, 0.0), observers[n].max_abs) for n in names}
    t = time.perf_counter()
    with progress.phase("scan", len(held)) as advance:
        # Held-out inputs also feed the observers when they were not used for fitting: final amax uses all.
        result = compare_pass(
            fp,
            qmodel,
            layers,
            held,
            candidates=candidates,
            observers=observers if fit_only else None,
            histograms=histograms,
            output_keys=list(opts.outputs) or None,
            progress=advance,
            first_index=len(batches) - len(held),
        )
    timings["scan_s"] = time.perf_counter() - t

    table = build_table(layers, observers, result, methods=("naive",), extra_iso=sorted(alt_names))
    _add_sign_gain(table)

    excluded = exclude_by_thresholds(table, opts.thresholds)
    for n in names:
        if n not in excluded and any(glob_match(p, n) for p in opts.exclude):
            excluded[n] = ("listed in the user's exclusion file", {})
    excluded = {n: excluded[n] for n in names if n in excluded}

    comparison_rows = [
        _comparison_row("fp", None, len(names), len(names)),
        _comparison_row("naive", result.output_stats(), 0, len(names)),
    ]
    t = time.perf_counter()
    check = result
    if excluded:
        check = _verify(fp, qmodel, layers, held, excluded, opts, progress)
    # A quantized model that still turns non-finite: exclude the worst layer upstream of the first NaN/Inf,
    # one at a time, each step verified by a quantized pass (bounded: a few steps, never every layer).
    for _ in range(opts.max_nonfinite_repairs):
        if check.first_nonfinite is None:
            break
        upstream = [n for n in check.nonfinite_upstream if n not in excluded] or [
            n for n in names if n not in excluded
        ]
        if not upstream:
            break
        worst = max(upstream, key=lambda n: _badness(table, n))
        excluded[worst] = (
            f"the quantized model turns non-finite at {check.first_nonfinite}; worst isolated error upstream "
            f"(relative L1 {table.loc[worst, 'iso_naive_rel_l1']:.3g})",
            {"iso_naive_rel_l1": float(table.loc[worst, "iso_naive_rel_l1"])},
        )
        check = _verify(fp, qmodel, layers, held, excluded, opts, progress)
    excluded = {n: excluded[n] for n in names if n in excluded}
    if check is not result:
        timings["verify_s"] = time.perf_counter() - t
    comparison_rows.append(
        _comparison_row("naive+exclusion", check.output_stats(), len(excluded), len(names))
    )
    for n in names:
        for key, value in check.cum.get(n, ErrorStats()).metrics().items():
            table.loc[n, f"cum_policy_{key}"] = value
    policy_nonfinite = check.first_nonfinite

    table["decision"] = ["fp" if n in excluded else "naive" for n in names]
    table["reason"] = [excluded[n][0] if n in excluded else "" for n in names]
    rules = [Rule(match=n, method="fp", reason=excluded[n][0], metrics=excluded[n][1]) for n in excluded]
    rules.append(Rule(match="**", method="naive", reason=f"default: every other layer {spec.name}"))
    policy = Policy(rules=tuple(rules), spec=spec.name)

    quant_state = _quant_state(observers, qlayers, names, spec, prep.folded)
    timings["total_s"] = time.perf_counter() - t0
    return ScanResult(
        model_name=model_name,
        options=opts,
        layers=layers,
        table=table,
        excluded=excluded,
        policy=policy,
        comparison=pd.DataFrame(comparison_rows),
        first_nonfinite=result.first_nonfinite,
        policy_first_nonfinite=policy_nonfinite,
        quant_state=quant_state,
        calibration={"batches": len(batches), "fit_batches": len(fit), "heldout_batches": len(held)},
        timings=timings,
        observers=observers,
        histograms=histograms,
        folded_bn=prep.folded,
        fp_model=fp,
    )


def _badness(table: pd.DataFrame, name: str) -> float:
    """Isolated error used to rank layers; non-finite isolated outputs rank first."""
    value = float(table.loc[name, "iso_naive_rel_l1"])
    if table.loc[name, "iso_naive_nonfinite"] > 0:
        return math.inf
    return value if math.isfinite(value) else -1.0


def _verify(
    fp: nn.Module,
    qmodel: nn.Module,
    layers: list[LayerInfo],
    held: list[Batch],
    excluded: dict[str, Any],
    opts: ScanOptions,
    progress: PhaseProgress,
) -> PassResult:
    """One quantized pass over the held-out batches with the excluded layers in FP."""
    set_layer_enabled(qmodel, excluded, False)
    try:
        with progress.phase("verify exclusions", len(held)) as advance:
            return compare_pass(
                fp, qmodel, layers, held, output_keys=list(opts.outputs) or None, progress=advance
            )
    finally:
        set_layer_enabled(qmodel, excluded, True)


def _add_sign_gain(table: pd.DataFrame) -> None:
    """unsigned_gain_db: isolated SQNR with unsigned minus signed activation codes (non-negative inputs)."""
    gain = pd.Series(math.nan, index=table.index)
    if "iso_unsigned_sqnr_db" in table:
        gain = gain.fillna(table["iso_unsigned_sqnr_db"] - table["iso_naive_sqnr_db"])
    if "iso_signed_sqnr_db" in table:
        gain = gain.fillna(table["iso_naive_sqnr_db"] - table["iso_signed_sqnr_db"])
    table["unsigned_gain_db"] = gain


def _quant_state(
    observers: dict[str, LayerObserver],
    qlayers: dict[str, Any],
    names: list[str],
    spec: QuantSpec,
    folded: dict[str, str],
) -> dict[str, Any]:
    """Final amax refit on all calibration batches, so `apply` needs no recalibration."""
    layers = {}
    for n in names:
        obs = observers[n]
        layers[n] = {
            "input_amax": obs.amax().clone(),
            "input_unsigned": obs.unsigned(),
            "weight_amax": qlayers[n].weight_quantizer.amax.clone(),
            "channel_absmax": obs.chan_absmax.clone() if obs.chan_absmax is not None else None,
        }
    return {"version": 1, "spec": spec.to_dict(), "folded_bn": dict(folded), "layers": layers}
