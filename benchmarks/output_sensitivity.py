"""Output-referred sensitivity against the exact answer, and policy v2 against policy v1 and the oracle.

Per real model (`output_models.py`), in one run:

1. Cost: the scan without output scores (`--probes 0`, today's v1 scan), with them (same v1 decisions, so
   only the scores differ) first without the per-layer calibrator choice (`--no-calibrator-choice`: the
   naive and SmoothQuant candidates scored), then with it (its range histograms in the calibration pass,
   its amax values and its candidates' products: the default), and the default v2 scan; wall time side
   by side, ratios to the first. The scans take seconds and this machine's timing moves by a fifth run to
   run, so they are timed in `--cost-pairs` interleaved rounds (without, scores, scores + choice) and each
   ratio is the median of the rounds' ratios.
2. Accuracy of the scores: every layer quantized alone (naive) over the scan's own held-out batches,
   exactly (L quantized forwards: the slow answer), against `out_naive_err`: Spearman rank correlation
   over the layers whose `out_err_source` is an estimate, and the overlap of the two top-5s.
3. Decisions, measured on test data neither calibration nor the policy saw: relative output MSE (and the
   task metric) of all-naive, policy v1 (isolated thresholds), policy v2, and the oracle (the same FP
   budget spent greedily on the layers with the largest exact alone errors, the rest naive).

    .venv/bin/python benchmarks/output_sensitivity.py [--models digits,mobilenet,yolo] [--spec W8A8]
        [--cost-pairs 3] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
from output_models import MODELS, Case
from scipy.stats import spearmanr

from sensitivity import ScanOptions, scan
from sensitivity.capture.calibrate import calibrate
from sensitivity.capture.outputs import OutputSelector
from sensitivity.io.batches import split_holdout
from sensitivity.pipeline.exact import OutputReference
from sensitivity.quant.build import LayerQuant, quant_layers
from sensitivity.quant.registry import run_context
from sensitivity.spec import QuantSpec


def _timed(model: Any, case: Case, **options: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    result = scan(model, case.calib, ScanOptions(**{**case.options, **options}))
    return result, time.perf_counter() - t


def _exact_alone(result: Any, fit: list[Any], held: list[Any], select: OutputSelector) -> dict[str, float]:
    """Each layer quantized alone (naive) over the held-out batches, with the activation ranges of the
    fitting batches only, as the scan's own errors are (the final ranges have seen the held-out batches)."""
    ref = OutputReference.run(result.fp_model, result.layers, held, select)
    q = result.quantized_model("naive")
    names = list(result.table.index)
    spec = result.options.spec.with_options(calibrator=result.options.spec.calibrator)
    observers = calibrate(result.fp_model, result.layers, fit, spec)
    return {
        n: ref.alone(q, names, n, LayerQuant("naive", observers[n].amax(), observers[n].unsigned()))
        for n in names
    }


def measure_on_test(
    result: Any, configs: dict[str, LayerQuant], case: Case, select: OutputSelector
) -> tuple[float, float]:
    """(relative output MSE on the test batches, task metric) of the scan's model configured `configs`."""
    q = result.quantized_model("naive")
    ref = OutputReference.run(result.fp_model, result.layers, case.test, select)
    err = ref.measure(q, configs)
    metric = case.metric(q) if case.metric is not None else math.nan
    return err, metric


def oracle_configs(result: Any, exact: dict[str, float]) -> tuple[dict[str, LayerQuant], list[str]]:
    """The oracle: the scan's FP budget spent on the layers with the largest exact alone errors, every other
    layer naive; and those FP layers."""
    fp = sorted(exact, key=lambda n: -exact[n])[: result.options.fp_layer_budget(len(result.table))]
    naive = result.layer_configs("naive")
    return {n: LayerQuant("fp") if n in fp else naive[n] for n in naive}, fp


def run_case(
    case: Case, spec: str, probes: int | None = None, pairs: int = 3, seed: int = 0
) -> dict[str, Any]:
    model = case.model
    base: dict[str, Any] = {"spec": QuantSpec.parse(spec), "seed": seed}
    probed = {} if probes is None else {"probes": probes}
    with run_context(model):
        scan(model, case.calib[:2], ScanOptions(**{**case.options, "probes": 0, **base}))  # warm-up, untimed
        plain, bare, scored = [], [], []
        for _ in range(max(pairs, 1)):
            plain.append(_timed(model, case, probes=0, **base)[1])
            bare.append(
                _timed(model, case, policy="thresholds", calibrator_choices=False, **base, **probed)[1]
            )
            v1, t = _timed(model, case, policy="thresholds", **base, **probed)
            scored.append(t)
        t_plain, t_bare, t_scores = (statistics.median(t) for t in (plain, bare, scored))
        cost_bare = statistics.median(b / a for a, b in zip(plain, bare, strict=True))
        cost = statistics.median(b / a for a, b in zip(plain, scored, strict=True))
        v2, t_v2 = _timed(model, case, **base, **probed)
        select = v2.options.output_selector
        fit, held = split_holdout(case.calib, v2.options.holdout)
        t = time.perf_counter()
        exact = _exact_alone(v2, fit, held, select)
        t_exact = time.perf_counter() - t
        table = v2.table
        est = [n for n in table.index if str(table.loc[n, "out_err_source"]).startswith("probe")]
        rho = spearmanr([table.loc[n, "out_naive_err"] for n in est], [exact[n] for n in est]).correlation
        top_pred = set(sorted(est, key=lambda n: -table.loc[n, "out_naive_err"])[:5])
        top_exact = set(sorted(est, key=lambda n: -exact[n])[:5])
        budget = v2.options.fp_layer_budget(len(table))
        oracle, oracle_fp = oracle_configs(v2, exact)
        naive = v2.layer_configs("naive")
        configs = {
            "all-naive": naive,
            "policy v1": _as_v2_model(v1, v2),
            "policy v2": v2.layer_configs("policy"),
            "oracle": oracle,
        }
        fp_metric = case.metric(v2.fp_model) if case.metric is not None else math.nan
        rows = {label: measure_on_test(v2, cfg, case, select) for label, cfg in configs.items()}
    fp_counts = {
        "all-naive": 0,
        "policy v1": sum(1 for r in v1.table["decision"] if r == "fp"),
        "policy v2": sum(1 for r in v2.table["decision"] if r == "fp"),
        "oracle": len(oracle_fp),
    }
    return {
        "name": case.name, "layers": len(table), "estimated": len(est), "rho": rho,
        "top5": len(top_pred & top_exact), "t_plain": t_plain, "t_scores": t_scores, "t_v2": t_v2,
        "cost": cost, "pairs": len(plain), "t_bare": t_bare, "cost_bare": cost_bare,
        "t_exact": t_exact, "rows": rows, "fp": fp_counts, "fp_metric": fp_metric, "budget": budget,
        "metric_name": case.metric_name, "probes": v2.table["out_err_source"].iloc[0],
    }  # fmt: skip


def _as_v2_model(v1: Any, v2: Any) -> dict[str, LayerQuant]:
    """Policy v1's settings, to run on v2's model object (same FP model and calibration)."""
    q1 = quant_layers(v1.quantized_model("policy"))
    configs = v1.layer_configs("policy")
    assert set(configs) == set(quant_layers(v2.quantized_model("naive"))) == set(q1)
    return configs


def report(r: dict[str, Any]) -> None:
    print(f"\n## {r['name']}: {r['layers']} layers ({r['estimated']} estimated by probes, {r['probes']})")
    print(f"Spearman out_naive_err vs exact one-at-a-time: {r['rho']:.3f}; top-5 overlap {r['top5']}/5")
    print(
        f"scan time (medians of {r['pairs']} interleaved rounds): v1 {r['t_plain']:.1f} s; with output scores "
        f"{r['t_bare']:.1f} s ({r['cost_bare']:.2f}x, median of the rounds' ratios), with them and the per-layer "
        f"calibrator choice (the default) {r['t_scores']:.1f} s ({r['cost']:.2f}x); v2 {r['t_v2']:.1f} s "
        f"({r['t_v2'] / r['t_plain']:.2f}x); exact one-at-a-time on the held-out batches {r['t_exact']:.1f} s"
    )
    metric = r["metric_name"]
    print(f"\n| config | FP layers | test rel. output MSE | {metric or 'task metric'} |")
    print("|---|---|---|---|")
    if metric:
        print(f"| FP | {r['layers']} | 0 | {r['fp_metric']:.4f} |")
    for label, (err, value) in r["rows"].items():
        shown = f"{value:.4f}" if math.isfinite(value) else "—"
        print(f"| {label} | {r['fp'][label]} | {err:.4g} | {shown} |")
    v2, oracle = r["rows"]["policy v2"][0], r["rows"]["oracle"][0]
    print(f"\npolicy v2 / oracle output error: {v2 / oracle:.3f} (FP budget {r['budget']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--spec", default="W8A8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probes", type=int, default=None, help="probes per batch (default: the scan's)")
    parser.add_argument(
        "--cost-pairs", type=int, default=3,
        help="interleaved rounds timed: without scores / with them / with them and the calibrator choice",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", default="0",
        help="comma-separated scan seeds (the output probes' signs); with several, a summary over them",
    )  # fmt: skip
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    results: dict[str, list[dict[str, Any]]] = {}
    for name in args.models.split(","):
        for seed in seeds:
            if len(seeds) > 1:
                print(f"\n# seed {seed}")
            results.setdefault(name, []).append(
                run_case(MODELS[name](), args.spec, args.probes, args.cost_pairs, seed)
            )
            report(results[name][-1])
    if len(seeds) > 1:
        summary(results, seeds)


def summary(results: dict[str, list[dict[str, Any]]], seeds: list[int]) -> None:
    """Per model over the seeds: how the probes' random signs move the ranking and the verified policy."""
    print(f"\n## over seeds {','.join(map(str, seeds))}")
    print(
        "| model | Spearman median (min) | top-5 min | policy v2 / oracle median (max) | seeds above 1.10 |"
    )
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        rho = [r["rho"] for r in runs]
        ratio = [r["rows"]["policy v2"][0] / r["rows"]["oracle"][0] for r in runs]
        print(
            f"| {name} | {statistics.median(rho):.3f} ({min(rho):.3f}) | {min(r['top5'] for r in runs)}/5 | "
            f"{statistics.median(ratio):.3f} ({max(ratio):.3f}) | {sum(v > 1.10 for v in ratio)} of {len(runs)} |"
        )


if __name__ == "__main__":
    main()
