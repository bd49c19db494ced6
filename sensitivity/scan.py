"""`scan()`: the whole analysis, from an FP model and calibration batches to a `ScanResult`.

Phases: prepare (deepcopy, fold BN, order layers) -> calibrate on the fitting batches -> per held-out batch
an FP pass (isolated errors of every candidate: naive, other activation sign, SmoothQuant per alpha, in its
hooks) and a quantized pass (cumulative errors) -> naive+exclusion and the per-layer policy, each verified
by one quantized pass -> amax and factors refitted on all batches for the final model.
Decisions are scored on held-out batches so that a choice that only fits the calibration data loses.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from sensitivity import distributed as D
from sensitivity.candidates import build_candidates, sq_key
from sensitivity.capture.observe import LayerObserver, RangeHistogram
from sensitivity.capture.outputs import OutputSelector
from sensitivity.capture.passes import PassResult, calibrate, compare_pass
from sensitivity.data import Batch, batch_len, first_sample, split_holdout
from sensitivity.errors import CalibrationDataError, SensitivityError, SpecError
from sensitivity.fold import find_fold_site
from sensitivity.load import _exc
from sensitivity.metrics import ErrorStats
from sensitivity.policy import DEFAULT_SQ_MARGIN, Policy, Rule, Thresholds, assign_methods, glob_match
from sensitivity.policy.exclude import exclude_by_thresholds
from sensitivity.prepare import LayerInfo, prepare
from sensitivity.quant.build import ActQuant, LayerQuant, build_quant_model, configure_layers, quant_layers
from sensitivity.quant.spec import QuantSpec
from sensitivity.resume import _fingerprint, load_calibration_checkpoint, save_calibration_checkpoint
from sensitivity.smoothquant import GRANULARITIES, MODES, smoothed_input_amax, smoothing_factors
from sensitivity.table import build_table

__all__ = [
    "DEFAULT_ALPHAS",
    "PhaseProgress",
    "ScanOptions",
    "ScanResult",
    "calibrate_quant_state",
    "scan",
    "state_configs",
]

log = logging.getLogger(__name__)

#: Default SmoothQuant alpha: the notes' stable 0.5, one candidate per layer, which keeps the default scan
#: within its budget (about 3.5x an FP forward, benchmarks/README.md); each extra alpha costs one more
#: layer call per layer on the held-out batches. `--alpha-grid 0.25,0.5,0.75` or `0.1:0.9:0.1` sweep.
DEFAULT_ALPHAS = (0.5,)


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
    #: SmoothQuant: alphas to try (empty = off), granularities ("channel", research "im2col"), mode
    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    granularities: tuple[str, ...] = ("channel",)
    sq_mode: str = "static"
    sq_margin: float = DEFAULT_SQ_MARGIN
    #: with an `evaluate` function: the metric key to budget on (default: the first returned) and the
    #: allowed drop from FP (same units as the metric); None = no greedy exclusion
    eval_metric: str | None = None
    exclude_budget: float | None = None
    #: where the passes run ("cpu", "cuda", "cuda:1"); batches are moved there one at a time
    device: str = "cpu"
    #: held-out batches are scanned in pieces whose stored FP outputs fit this many MiB (tensor batches of
    #: per-sample models: same numbers, bounded memory); 0 = whole batches
    stored_activation_mb: float = 128.0
    #: `output -> {name: tensor}`: what the model's outputs are (instead of `outputs` keys), each measured apart
    output_fn: Callable[[Any], Any] | None = None

    @property
    def output_selector(self) -> OutputSelector:
        return OutputSelector(tuple(self.outputs), self.output_fn)

    def __post_init__(self) -> None:
        bad = [g for g in self.granularities if g not in GRANULARITIES]
        if bad:
            raise SpecError(
                f"unknown SmoothQuant granularity {bad[0]!r}; choose from {', '.join(GRANULARITIES)}"
            )
        if self.sq_mode not in MODES:
            raise SpecError(f"unknown SmoothQuant mode {self.sq_mode!r}; choose static or dynamic")
        if not 0.0 < self.holdout < 1.0:
            raise SpecError(f"--holdout must be in (0, 1), got {self.holdout}")
        if not 0.0 < self.sq_margin <= 1.0:
            raise SpecError(f"SmoothQuant margin must be in (0, 1], got {self.sq_margin}")


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
    sweeps: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    folded_bn: dict[str, str] = field(default_factory=dict)
    fp_model: nn.Module | None = field(repr=False, default=None)
    #: conv-like modules that were not scanned -> why (TorchScript, never ran, --only/--skip, ...)
    unscanned: dict[str, str] = field(default_factory=dict)
    #: things the user should know about this scan's trustworthiness (shown on the console and in the report)
    warnings: list[str] = field(default_factory=list)
    #: the comparison per named model output (config, output, out_* metrics): outputs in different units
    #: (box coordinates, class scores) are measured apart
    output_comparison: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def spec(self) -> QuantSpec:
        return self.options.spec

    def layer_configs(self, config: str = "policy") -> dict[str, LayerQuant]:
        """Per-layer settings of `config`: "policy", "naive" (every layer W/A quantized) or "exclusion"."""
        return state_configs(self.quant_state, config, self.excluded)

    def quantized_model(self, config: str = "policy") -> nn.Module:
        """The scanned model quantized with the final amax and factors (refitted on all batches), per
        `config` (see `layer_configs`). Built on the in-memory, BN-folded FP model of this scan, whose weight
        tensors it shares (use `apply_policy` for a standalone, deployable copy)."""
        if self.fp_model is None:
            raise ValueError("this ScanResult holds no model (it was loaded from disk)")
        configs = self.layer_configs(config)
        acts = {
            n: ActQuant(s["input_amax"], bool(s["input_unsigned"]))
            for n, s in self.quant_state["layers"].items()
        }
        model = build_quant_model(self.fp_model, acts, self.spec)
        configure_layers(model, configs)
        return model

    def save(self, out_dir: str, overwrite: bool = False, report: bool = True, inputs: Sequence[Any] = ()) -> Any:
        """Write the report folder (atomically); `report=False` skips report.html and the plots. An
        existing folder is replaced only with `overwrite` and only when sensitivity wrote it; `inputs`
        (paths of the model, data...) may not lie in it or hold it."""
        from sensitivity.output import write_scan

        return write_scan(self, out_dir, overwrite=overwrite, report=report, inputs=inputs)


def state_configs(
    quant_state: dict[str, Any], config: str = "policy", excluded: Any = ()
) -> dict[str, LayerQuant]:
    """Layer settings from a quant state: "policy" (its methods), "naive" (all quantized) or "exclusion"
    (naive with the `excluded` layers in FP)."""
    out = {}
    for n, s in quant_state["layers"].items():
        naive = LayerQuant("naive", s["input_amax"], bool(s["input_unsigned"]))
        if config == "naive":
            out[n] = naive
        elif config == "exclusion":
            out[n] = LayerQuant("fp") if n in excluded else naive
        elif s["method"] == "smoothquant":
            dyn = s["alpha"] if s.get("mode") == "dynamic" else None
            out[n] = LayerQuant("smoothquant", s["smooth_input_amax"], False, s["smooth_scale"], dyn)
        else:
            out[n] = LayerQuant("fp") if s["method"] == "fp" else naive
    return out


def _run_eval(evaluate: Callable[[nn.Module], dict[str, float]], model: nn.Module) -> dict[str, float]:
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


def _eval_fp(evaluate: Callable[[nn.Module], dict[str, float]], fp: nn.Module) -> dict[str, float]:
    """The metric of the FP model, first of all (a broken --eval fails in seconds, not after the scan)."""
    values = _run_eval(evaluate, fp)
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        k, v = next(iter(bad.items()))
        raise SpecError(f"--eval function returned {k}={v} for the FP model: every metric must be a finite number")
    return values


def _evaluate(
    evaluate: Callable[[nn.Module], dict[str, float]],
    fp_eval: dict[str, float],
    qmodel: nn.Module,
    quant_state: dict[str, Any],
    excluded: dict[str, Any],
    rules: dict[str, Rule],
    table: pd.DataFrame,
    opts: ScanOptions,
    progress: PhaseProgress,
    notes: list[str],
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """User metric for naive / naive+exclusion / policy (FP measured before), then the greedy exclusion
    budget (mutates `rules` and `quant_state` methods for the layers it moves to FP; what went wrong goes
    to `notes`)."""

    def run(model: nn.Module) -> dict[str, float]:
        return _run_eval(evaluate, model)

    evals: dict[str, dict[str, float]] = {"fp": fp_eval}
    with progress.phase("evaluate", 3) as advance:
        for label, config in (("naive", "naive"), ("naive+exclusion", "exclusion"), ("policy", "policy")):
            configure_layers(qmodel, state_configs(quant_state, config, excluded))
            evals[label] = run(qmodel)
            advance()
    steps: list[dict[str, Any]] = []
    if opts.exclude_budget is None:
        return evals, steps
    key = opts.eval_metric or next(iter(evals["fp"]))
    if key not in evals["fp"]:
        raise SpecError(f"--eval-metric {key!r} is not among the metrics returned: {', '.join(evals['fp'])}")
    target = evals["fp"][key] - opts.exclude_budget
    current = evals["policy"][key]

    def sensitivity(n: str) -> float:
        col = "iso_sq_rel_l1" if rules[n].method == "smoothquant" else "iso_naive_rel_l1"
        v = float(table.loc[n, col]) if col in table.columns else math.nan
        return v if math.isfinite(v) else math.inf

    order = sorted((n for n, r in rules.items() if r.method != "fp"), key=sensitivity, reverse=True)
    with progress.phase("exclusion budget", len(order)) as advance:
        for n in order:
            if current >= target:  # a NaN metric (a broken quantized model) never meets the target
                break
            rules[n] = Rule(
                match=n, method="fp",
                reason=f"exclusion budget: {key} below FP {evals['fp'][key]:.4g} - {opts.exclude_budget:g}",
                metrics={**rules[n].metrics, f"eval_{key}_before": current},
            )  # fmt: skip
            quant_state["layers"][n]["method"] = "fp"
            configure_layers(qmodel, state_configs(quant_state, "policy"))
            current = run(qmodel)[key]
            steps.append({"step": len(steps) + 1, "layer": n, "metric": current})
            advance()
    if steps:
        configure_layers(qmodel, state_configs(quant_state, "policy"))
        evals["policy"] = run(qmodel)
    broken = [c for c in ("naive", "naive+exclusion", "policy") if not math.isfinite(evals[c][key])]
    broken += [f"budget step {st['step']}" for st in steps if not math.isfinite(st["metric"])]
    if broken:
        notes.append(
            f"--eval returned a non-finite {key} for {', '.join(broken)} (a broken quantized model: counted as "
            "failing the budget)"
        )
    if not current >= target:
        notes.append(
            f"the exclusion budget was not reached: {key} {current:.4g} with {len(steps)} more layers in FP, "
            f"target {target:.4g} (FP {evals['fp'][key]:.4g} - {opts.exclude_budget:g})"
        )
    return evals, steps


_OUT_METRICS = ("rel_l1", "sqnr_db", "cosine", "max_abs", "nonfinite")


def _comparison_row(name: str, stats: ErrorStats | None, fp_layers: int, n_layers: int) -> dict[str, Any]:
    row: dict[str, Any] = {"config": name, "quantized_layers": n_layers - fp_layers, "fp_layers": fp_layers}
    m = stats.metrics() if stats is not None else None
    for key in _OUT_METRICS:
        if m is None:
            row[f"out_{key}"] = {"rel_l1": 0.0, "sqnr_db": math.inf, "cosine": 1.0}.get(key, 0.0)
        else:
            row[f"out_{key}"] = m[key]
    return row


def _badness(table: pd.DataFrame, name: str) -> float:
    """Isolated error used to rank layers; non-finite isolated outputs rank first."""
    if table.loc[name, "iso_naive_nonfinite"] > 0:
        return math.inf
    value = float(table.loc[name, "iso_naive_rel_l1"])
    return value if math.isfinite(value) else -1.0


class _Verifier:
    """Quantized passes over the held-out batches for a configuration, with non-finite repair."""

    def __init__(self, fp: nn.Module, qmodel: nn.Module, layers: list[LayerInfo], held: list[Batch],
                 opts: ScanOptions, progress: PhaseProgress) -> None:  # fmt: skip
        self.fp, self.qmodel, self.layers, self.held = fp, qmodel, layers, held
        self.opts, self.progress = opts, progress
        self.names = [layer.name for layer in layers]

    def run(self, configs: dict[str, LayerQuant], label: str) -> PassResult:
        configure_layers(self.qmodel, configs)
        with self.progress.phase(f"verify {label}", len(self.held)) as advance:
            result = compare_pass(
                self.fp, self.qmodel, self.layers, self.held, outputs=self.opts.output_selector,
                progress=advance, device=self.opts.device, stored_budget_mb=self.opts.stored_activation_mb,
            )  # fmt: skip
        D.reduce_pass_(result)
        return result

    def repaired(
        self, configs: dict[str, LayerQuant], label: str, table: pd.DataFrame, fp_reasons: dict[str, Any]
    ) -> PassResult:
        """Verify; while the model turns non-finite, put the worst layer upstream of it in FP and retry.

        Bounded (a few steps): each step is one quantized pass. `fp_reasons` gains the repaired layers."""
        check = self.run(configs, label)
        for _ in range(self.opts.max_nonfinite_repairs):
            if check.first_nonfinite is None:
                break
            quantized = [n for n in self.names if configs[n].method != "fp"]
            upstream = [n for n in check.nonfinite_upstream if configs[n].method != "fp"] or quantized
            if not upstream:
                break
            worst = max(upstream, key=lambda n: _badness(table, n))
            fp_reasons[worst] = (
                f"the quantized model turns non-finite at {check.first_nonfinite}; worst isolated error upstream "
                f"(relative L1 {table.loc[worst, 'iso_naive_rel_l1']:.3g})",
                {"iso_naive_rel_l1": float(table.loc[worst, "iso_naive_rel_l1"])},
            )
            configs[worst] = LayerQuant("fp")
            check = self.run(configs, label)
        return check


F = TypeVar("F", bound=Callable[..., Any])


def _single_threaded_if_sparse(fn: F) -> F:
    """Run `fn(model, ...)` with one torch thread when the model has spconv layers on CPU: spconv's CPU
    kernels race with several threads (wrong outputs that would read as quantization error)."""

    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        from sensitivity.integrations.spconv import single_thread_if_sparse

        with single_thread_if_sparse(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _sq_columns(
    table: pd.DataFrame, result: PassResult, names: list[str], opts: ScanOptions
) -> dict[str, np.ndarray]:
    """Best SmoothQuant candidate per layer into the table (`iso_sq_*` channel, `iso_sqi_*` im2col) and
    the full alpha sweeps [K, 3] (alpha, iso rel L1, iso SQNR dB) for stats.npz."""
    sweeps: dict[str, np.ndarray] = {}
    for gran, prefix, key in (("channel", "sq", "alpha_sweep"), ("im2col", "sqi", "alpha_sweep_im2col")):
        if gran not in opts.granularities or not opts.alphas:
            continue
        best_rows = []
        for n in names:
            rows = []
            for a in opts.alphas:
                stats = result.iso.get((n, sq_key(gran, a)))
                if stats is not None:
                    m = stats.metrics()
                    rows.append((a, m["rel_l1"], m["sqnr_db"], m, m["nonfinite"]))
            if rows:
                sweeps[f"{key}/{n}"] = np.array([r[:3] for r in rows], dtype=np.float64)
                finite = [r for r in rows if r[4] == 0 and math.isfinite(r[1])] or rows
                best = min(finite, key=lambda r: (r[1] if math.isfinite(r[1]) else math.inf, abs(r[0] - 0.5)))
                best_rows.append((n, best))
        for n, (a, _, _, m, _) in best_rows:
            for metric, value in m.items():
                table.loc[n, f"iso_{prefix}_{metric}"] = value
            table.loc[n, f"{prefix}_alpha"] = a
            table.loc[n, f"{prefix}_granularity"] = gran
            table.loc[n, f"{prefix}_mode"] = opts.sq_mode
    return sweeps


@_single_threaded_if_sparse
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
) -> ScanResult:
    """Measure every target layer's isolated and cumulative quantization error; decide FP / naive /
    SmoothQuant per layer; verify the decisions with quantized passes on held-out batches.

    `evaluate(model) -> {metric: value}` (higher is better, e.g. top-1 or mAP) scores FP, all-naive,
    naive+exclusion and the policy; with `options.exclude_budget` the next most sensitive layer is put in
    FP, one evaluation per step, until the metric is within the budget of FP.

    `resume_file`: where the calibration is checkpointed once done (removed by the caller when the
    report is written); with `resume=True` a matching checkpoint there replaces the calibration pass.
    """
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
        prep = prepare(
            model,
            batches[0],
            only=list(opts.only),
            skip=list(opts.skip),
            fold_bn=opts.fold_bn,
            device=opts.device,
        )
        advance()
    fp, layers, names = prep.model, prep.layers, prep.names
    fp_eval = _eval_fp(evaluate, fp) if evaluate is not None else {}
    fit, held = split_holdout(batches, opts.holdout)
    fit_only = len(fit) + len(held) == len(batches) and len(batches) > 1
    timings["prepare_s"] = time.perf_counter() - t0

    # Distributed (torchrun): this rank's shard of each list; statistics all-reduced after each pass.
    fit_local, held_local = D.shard(fit), D.shard(held)

    def new_observers(
        hist_range: dict[str, float] | None = None, obs_spec: QuantSpec = spec
    ) -> dict[str, LayerObserver]:
        obs = {
            n: LayerObserver(
                obs_spec, _channel_axis(fp.get_submodule(n)), hist_range=(hist_range or {}).get(n)
            )
            for n in names
        }
        if "im2col" in opts.granularities and opts.alphas and opts.sq_mode == "static":
            from sensitivity.im2col import im2col_refusal

            for n in names:
                mod = fp.get_submodule(n)
                if im2col_refusal(mod) is None:
                    obs[n].col_module = mod
        return obs

    t = time.perf_counter()
    fingerprint = _fingerprint(fp, batches, opts) if resume_file is not None else ""
    observers = (
        load_calibration_checkpoint(resume_file, fingerprint, new_observers, layers) if resume else None
    )
    if observers is not None:
        progress.note(f"resumed: calibration of {len(fit)} batches loaded from {resume_file}")
    else:
        observers = new_observers()
        if D.is_distributed() and spec.calibrator != "max":
            # histograms add up across ranks only over one fixed range: a max pass first (distributed.py)
            ranges = new_observers(obs_spec=spec.with_options(calibrator="max"))
            with progress.phase("calibrate (range)", len(fit_local)) as advance:
                calibrate(fp, layers, fit_local, spec, progress=advance, observers=ranges, device=opts.device)
            D.reduce_observers_(ranges)
            observers = new_observers({n: ranges[n].max_abs for n in names})
        with progress.phase("calibrate", len(fit_local)) as advance:
            calibrate(fp, layers, fit_local, spec, progress=advance, observers=observers, device=opts.device,
                      outputs=opts.output_selector)  # fmt: skip
        D.reduce_observers_(observers)
        if resume_file is not None and D.is_main():
            save_calibration_checkpoint(resume_file, fingerprint, observers, layers)
    timings["calibrate_s"] = time.perf_counter() - t

    fixed = _checkpoint_amax(model, names)
    acts = {
        n: ActQuant(fixed[n], False) if n in fixed else ActQuant(observers[n].amax(), observers[n].unsigned())
        for n in names
    }
    qmodel = build_quant_model(fp, acts, spec)
    qlayers = {n: m for n, m in quant_layers(qmodel).items() if n in acts}
    candidates, im2col_refused = build_candidates(
        qlayers, observers, spec, opts.alphas, opts.granularities if opts.alphas else (), opts.sq_mode,
        no_smoothing={layer.name for layer in layers if layer.weight_transformed},
    )  # fmt: skip
    alt_names = sorted({c for cands in candidates.values() for c in cands if c in ("signed", "unsigned")})
    histograms = {n: RangeHistogram(min(observers[n].min_value, 0.0), observers[n].max_abs) for n in names}

    t = time.perf_counter()
    # Held-out inputs also feed the observers when they were not used for fitting: final amax uses all.
    # Distributed, they go to fresh observers that are all-reduced, then merged (no double counting).
    refit = (new_observers({n: observers[n].hist_range for n in names}) if D.is_distributed() else observers) \
        if fit_only else None  # fmt: skip
    with progress.phase("scan", len(held_local)) as advance:
        result = compare_pass(
            fp, qmodel, layers, held_local, candidates=candidates, observers=refit,
            histograms=histograms, outputs=opts.output_selector, progress=advance,
            first_index=len(batches) - len(held), device=opts.device, stored_budget_mb=opts.stored_activation_mb,
        )  # fmt: skip
    del candidates
    D.reduce_pass_(result)
    D.reduce_histograms_(histograms)
    if refit is not None and refit is not observers:
        D.reduce_observers_(refit)
        for n in names:
            observers[n].merge(refit[n])
    timings["scan_s"] = time.perf_counter() - t

    table = build_table(layers, observers, result, methods=("naive",), extra_iso=alt_names)
    _add_sign_gain(table)
    sweeps = _sq_columns(table, result, names, opts)
    for n, why in im2col_refused.items():
        table.loc[n, "sqi_refused"] = why
    fold_sites = {n: find_fold_site(prep.flow, n) for n in names}
    table["sq_fold"] = [fold_sites[n].producer or "" for n in names]
    table["sq_fold_reason"] = [fold_sites[n].reason for n in names]

    # Fit-batch statistics (what the held-out scoring measured) for the verification passes.
    fit_configs = {n: LayerQuant("naive", acts[n].amax, acts[n].unsigned) for n in names}
    user_fp = [n for n in names if any(glob_match(p, n) for p in opts.exclude)]
    verifier = _Verifier(fp, qmodel, layers, held_local, opts, progress)
    t = time.perf_counter()

    # naive + exclusion (policy v1): thresholds on the isolated naive error, plus the user's list
    excluded: dict[str, tuple[str, dict[str, float]]] = dict(exclude_by_thresholds(table, opts.thresholds))
    for n in user_fp:
        excluded.setdefault(n, ("listed in the user's exclusion file", {}))
    ex_configs = {n: (LayerQuant("fp") if n in excluded else fit_configs[n]) for n in names}
    if excluded or result.first_nonfinite is not None:
        ex_check = verifier.repaired(ex_configs, "exclusion", table, excluded)
    else:
        ex_check = result
    excluded = {n: excluded[n] for n in names if n in excluded}

    # the policy: FP / naive / SmoothQuant per layer
    rules = assign_methods(table, opts.thresholds, margin=opts.sq_margin, forced_fp=user_fp)
    pol_configs: dict[str, LayerQuant] = {}
    for n in names:
        rule = rules[n]
        if rule.method == "fp":
            pol_configs[n] = LayerQuant("fp")
        elif rule.method == "smoothquant":
            pol_configs[n] = _sq_config(observers[n], qlayers[n], rule, fit=True)
        else:
            pol_configs[n] = fit_configs[n]
    uses_sq = any(r.method == "smoothquant" for r in rules.values())
    repaired: dict[str, Any] = {}
    if uses_sq or any(r.method == "fp" for r in rules.values()) or result.first_nonfinite is not None:
        pol_check = verifier.repaired(pol_configs, "policy", table, repaired)
    else:
        pol_check = result
    for n, (reason, metrics) in repaired.items():
        rules[n] = Rule(match=n, method="fp", reason=reason, metrics=metrics)
    timings["verify_s"] = time.perf_counter() - t

    def final_state() -> dict[str, Any]:
        state = _quant_state(observers, qlayers, rules, spec, prep.folded)
        for n, amax in fixed.items():  # the checkpoint's own calibration stays the final one
            state["layers"][n]["input_amax"] = amax.clone()
            state["layers"][n]["input_unsigned"] = False
        state["sq_fold"] = {n: site.producer for n, site in fold_sites.items() if site.producer}
        state["example_input"] = _example(batches[0])
        return state

    quant_state = final_state()
    evals: dict[str, dict[str, float]] = {}
    budget_steps: list[dict[str, Any]] = []
    eval_notes: list[str] = []
    if evaluate is not None:
        t = time.perf_counter()
        evals, budget_steps = _evaluate(
            evaluate, fp_eval, qmodel, quant_state, excluded, rules, table, opts, progress, eval_notes
        )
        if budget_steps:  # the budget moved layers to FP: re-derive the state and re-verify both configs
            quant_state = final_state()
            pol_configs = state_configs(quant_state, "policy")
            pol_check = verifier.run(pol_configs, "policy")
            for step in budget_steps:  # exclude.yaml lists every layer the budget keeps in FP
                rule = rules[step["layer"]]
                excluded[step["layer"]] = (rule.reason, dict(rule.metrics))
            excluded = {n: excluded[n] for n in names if n in excluded}
            ex_check = verifier.run(state_configs(quant_state, "exclusion", excluded), "exclusion")
        timings["eval_s"] = time.perf_counter() - t

    for n in names:
        for key, value in pol_check.cum.get(n, ErrorStats()).metrics().items():
            table.loc[n, f"cum_policy_{key}"] = value
    table["decision"] = [rules[n].method for n in names]
    table["alpha"] = [rules[n].alpha if rules[n].alpha is not None else math.nan for n in names]
    table["reason"] = [rules[n].reason for n in names]
    if budget_steps:
        step_of = {row["layer"]: row for row in budget_steps}
        table["budget_step"] = [step_of[n]["step"] if n in step_of else math.nan for n in names]
        table["eval_after_exclusion"] = [step_of[n]["metric"] if n in step_of else math.nan for n in names]

    n_layers = len(names)
    pol_fp = sum(1 for r in rules.values() if r.method == "fp")
    comparison = pd.DataFrame(
        [
            _comparison_row("fp", None, n_layers, n_layers),
            _comparison_row("naive", result.output_stats(), 0, n_layers),
            _comparison_row("naive+exclusion", ex_check.output_stats(), len(excluded), n_layers),
            _comparison_row("policy", pol_check.output_stats(), pol_fp, n_layers),
        ]
    )
    comparison["smoothquant_layers"] = [0, 0, 0, sum(1 for r in rules.values() if r.method == "smoothquant")]
    checks = {"naive": result, "naive+exclusion": ex_check, "policy": pol_check}
    output_comparison = pd.DataFrame(
        [
            {"config": config, "output": key, **_comparison_row(config, stats, 0, 0)}
            for config, check in checks.items()
            for key, stats in check.out.items()
        ],
        columns=["config", "output", *(f"out_{k}" for k in _OUT_METRICS)],
    )
    for key in sorted({k for v in evals.values() for k in v}):
        comparison[f"eval_{key}"] = [evals.get(c, {}).get(key, math.nan) for c in comparison["config"]]
    policy_rules = [rules[n] for n in names if rules[n].method != "naive"]
    policy_rules.append(Rule(match="**", method="naive", reason=f"default: every other layer {spec.name}"))
    policy = Policy(rules=tuple(policy_rules), spec=spec.name)
    timings["total_s"] = time.perf_counter() - t0
    return ScanResult(
        model_name=model_name,
        options=opts,
        layers=layers,
        table=table,
        excluded=excluded,
        policy=policy,
        comparison=comparison,
        output_comparison=output_comparison,
        first_nonfinite=result.first_nonfinite,
        policy_first_nonfinite=pol_check.first_nonfinite,
        quant_state=quant_state,
        calibration={"batches": len(batches), "fit_batches": len(fit), "heldout_batches": len(held)},
        timings=timings,
        observers=observers,
        histograms=histograms,
        sweeps=sweeps,
        folded_bn=prep.folded,
        fp_model=fp,
        unscanned=prep.unscanned,
        warnings=_scan_warnings(prep.unscanned, held, batches) + eval_notes,
    )


#: Fewer held-out samples than this and the decisions rest on too little data to trust.
MIN_HELDOUT_SAMPLES = 32


def _scan_warnings(unscanned: dict[str, str], held: list[Batch], batches: list[Batch]) -> list[str]:
    """What makes this scan less trustworthy than it looks: layers left out, too little held-out data."""
    out = []
    if unscanned:
        first = "; ".join(f"{n} ({why})" for n, why in list(unscanned.items())[:3])
        more = f" and {len(unscanned) - 3} more" if len(unscanned) > 3 else ""
        out.append(f"{len(unscanned)} conv-like layers were not scanned: {first}{more}")
    samples = sum(batch_len(b) or 1 for b in held)
    if len(batches) == 1:
        out.append(
            "only one calibration batch: it is both fitted and scored, so the decisions are not checked on "
            "held-out data (give more batches)"
        )
    elif samples < MIN_HELDOUT_SAMPLES:
        out.append(
            f"the decisions rest on {samples} held-out samples ({len(held)} batch{'es' if len(held) > 1 else ''}):"
            f" give more calibration data (at least {MIN_HELDOUT_SAMPLES} held-out samples) to trust them"
        )
    return out


def _checkpoint_amax(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Input amax a loaded checkpoint already carries (a pytorch-quantization model's `_input_quantizer._amax`,
    read by `sensitivity.load`): used instead of recalibrating those layers."""
    found = getattr(model, "sensitivity_checkpoint_amax", None) or {}
    return {
        n: torch.as_tensor(found[n]["input"]).float().reshape(())
        for n in names
        if n in found and "input" in found[n]
    }


def _example(batch: Batch) -> Any:
    """One sample of the first batch (tensor or tuple of tensors), kept for ONNX export without data."""
    small = first_sample(batch)
    if isinstance(small, torch.Tensor):
        return small.detach().cpu().clone()
    if isinstance(small, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in small):
        return tuple(t.detach().cpu().clone() for t in small)
    if isinstance(small, dict):  # e.g. an OpenPCDet batch_dict: its tensors and plain values
        plain = (int, float, str, bool)
        kept = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in small.items()
                if isinstance(v, (torch.Tensor, *plain))}  # fmt: skip
        return kept or None
    return None


def _channel_axis(module: nn.Module) -> int:
    from sensitivity.capture.observe import channel_dim

    return channel_dim(module)


def _sq_config(obs: LayerObserver, qmod: Any, rule: Rule, fit: bool) -> LayerQuant:
    """SmoothQuant settings from an observer's per-channel maxima (fit batches during the scan)."""
    assert rule.alpha is not None and obs.chan_absmax is not None
    if rule.mode == "dynamic":
        return LayerQuant("smoothquant", None, False, None, rule.alpha)
    s = smoothing_factors(obs.chan_absmax, qmod.weight_input_absmax(), rule.alpha)
    return LayerQuant("smoothquant", smoothed_input_amax(obs.chan_absmax, s), False, s)


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
    rules: dict[str, Rule],
    spec: QuantSpec,
    folded: dict[str, str],
) -> dict[str, Any]:
    """Final amax and SmoothQuant factors refitted on all calibration batches: `apply` needs no
    recalibration. SmoothQuant layers calibrate their smoothed input with max, exactly from the
    per-channel maxima (smoothing has already removed what percentile / entropy would clip)."""
    layers = {}
    for n, qmod in qlayers.items():
        obs = observers[n]
        rule = rules[n]
        entry: dict[str, Any] = {
            "method": rule.method,
            "input_amax": obs.amax().clone(),
            "input_unsigned": obs.unsigned(),
            "weight_amax": qmod.weight_quantizer.amax.clone(),
            "channel_absmax": obs.chan_absmax.clone() if obs.chan_absmax is not None else None,
            "alpha": rule.alpha,
            "granularity": rule.granularity,
            "mode": rule.mode,
            "smooth_scale": None,
            "smooth_input_amax": None,
        }
        if rule.method == "smoothquant" and rule.mode != "dynamic" and obs.chan_absmax is not None:
            assert rule.alpha is not None
            s = smoothing_factors(obs.chan_absmax, qmod.weight_input_absmax(), rule.alpha)
            entry["smooth_scale"] = s
            entry["smooth_input_amax"] = smoothed_input_amax(obs.chan_absmax, s)
        layers[n] = entry
    return {"version": 1, "spec": spec.to_dict(), "folded_bn": dict(folded), "layers": layers}


@_single_threaded_if_sparse
def calibrate_quant_state(
    model: nn.Module,
    batches: Sequence[Batch],
    policy: Policy,
    spec: QuantSpec,
    *,
    fold_bn: bool = True,
    progress: PhaseProgress | None = None,
) -> dict[str, Any]:
    """A quant state (as scan writes to quant_state.pt) from a fresh calibration on all `batches`, for
    `apply --calib`: amax per layer and, for the policy's SmoothQuant layers, their factors."""
    progress = progress or PhaseProgress()
    batches = list(batches)
    if not batches:
        raise CalibrationDataError("the calibration set is empty: give at least one batch")
    prep = prepare(model, batches[0], fold_bn=fold_bn)
    observers = {
        layer.name: LayerObserver(spec, _channel_axis(prep.model.get_submodule(layer.name)))
        for layer in prep.layers
    }
    with progress.phase("calibrate", len(batches)) as advance:
        calibrate(prep.model, prep.layers, batches, spec, progress=advance, observers=observers)
    acts = {n: ActQuant(observers[n].amax(), observers[n].unsigned()) for n in prep.names}
    qlayers = {n: m for n, m in quant_layers(build_quant_model(prep.model, acts, spec)).items() if n in acts}
    rules = {}
    for n in prep.names:
        rule = policy.rule_for(n)
        rules[n] = rule if rule is not None else Rule(match=n, method="naive")
    state = _quant_state(observers, qlayers, rules, spec, prep.folded)
    state["sq_fold"] = {
        n: site.producer for n in prep.names if (site := find_fold_site(prep.flow, n)).producer
    }
    state["example_input"] = _example(batches[0])
    return state
