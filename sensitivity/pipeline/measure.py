"""Stage 2: one pass over the held-out batches measures everything the decisions need.

Per batch, the FP pass computes every candidate's isolated error inside its hooks (naive, the other
activation sign, SmoothQuant per alpha and granularity) and the quantized pass the cumulative errors; the
held-out inputs also feed the observers (the final amax values use all batches) and the report's
histograms. The result is the LayerTable (pandas, one row per layer) plus the SmoothQuant sweeps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from torch import nn

from sensitivity import distributed as D
from sensitivity.capture.observe import LayerObserver, RangeHistogram
from sensitivity.capture.passes import PassResult, compare_pass
from sensitivity.capture.pieces import held_pieces, kept_budget_mb, probe_copies, sample_mb, verify_copies
from sensitivity.fold import FoldSite, find_fold_site
from sensitivity.io.batches import batch_len
from sensitivity.methods.base import sq_key
from sensitivity.methods.candidates import build_candidates
from sensitivity.methods.ranges import InputVariants
from sensitivity.pipeline.calibration import Calibration, observers_for
from sensitivity.pipeline.exact import OutputReference, ReferenceFromProbes
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.quant.build import build_quant_model, quant_layers
from sensitivity.quant.modules import QuantMixin
from sensitivity.spec import CALIBRATOR_CHOICES
from sensitivity.table import build_table

__all__ = ["Measurement", "measure_stage"]


@dataclass
class Measurement:
    qmodel: nn.Module
    qlayers: dict[str, QuantMixin]
    result: PassResult
    table: pd.DataFrame
    histograms: dict[str, RangeHistogram]
    sweeps: dict[str, np.ndarray]
    fold_sites: dict[str, FoldSite]
    #: the FP outputs on the held-out batches and their energies (with output probes or policy v2)
    reference: OutputReference | None = None
    #: output probes per held-out piece (0: none)
    probes: int = 0


def _refit_observers(cal: Calibration, opts: ScanOptions) -> dict[str, LayerObserver] | None:
    """Where the held-out inputs go: the same observers (single process), or fresh ones all-reduced and
    merged afterwards (distributed: no double counting); None when they were fitted on already."""
    if not cal.fit_only:
        return None
    if not D.is_distributed():
        return cal.observers
    ranges = {n: o.hist_range for n, o in cal.observers.items() if o.hist_range is not None}
    return observers_for(cal.prep.model, cal.names, opts.spec, opts, ranges)


def measure_stage(
    cal: Calibration, opts: ScanOptions, progress: PhaseProgress, timings: dict[str, float]
) -> Measurement:
    fp, layers, names, observers = cal.prep.model, cal.prep.layers, cal.names, cal.observers
    qmodel = build_quant_model(fp, cal.acts(), opts.spec)
    qlayers = {n: m for n, m in quant_layers(qmodel).items() if n in observers}
    candidates, im2col_refused = build_candidates(
        qlayers, observers, opts.spec, opts.alphas, opts.granularities if opts.alphas else (), opts.sq_mode,
        no_smoothing={layer.name for layer in layers if layer.weight_transformed},
    )  # fmt: skip
    alt_names = sorted({c for cands in candidates.values() for c in cands if c in ("signed", "unsigned")})
    variants = _input_variants(qlayers, observers, opts)
    # all ranks' held-out samples
    probes = opts.probe_count(sum(batch_len(b) or 1 for b in cal.held), sample_mb(layers))
    histograms = {n: RangeHistogram(min(observers[n].min_value, 0.0), observers[n].max_abs) for n in names}
    t = time.perf_counter()
    refit = _refit_observers(cal, opts)
    reference, first = None, len(cal.batches) - len(cal.held)
    from_probes = _reference_from_probes(cal, opts, probes, first)
    # the reference's energies normalise the probes and every output error
    if from_probes is None and (probes or opts.policy == "output"):
        reference = OutputReference.run(
            fp, layers, cal.held_local, opts.output_selector, first_index=first, device=opts.device,
            budget_mb=opts.stored_activation_mb, copies=verify_copies(layers, opts.stored_activation_mb, probes),
        )  # fmt: skip
    with progress.phase("scan", len(cal.held_local)) as advance:
        result = compare_pass(
            fp, qmodel, layers, cal.held_local, candidates=candidates, observers=refit,
            histograms=histograms, outputs=opts.output_selector, progress=advance,
            first_index=first, device=opts.device, stored_budget_mb=opts.stored_activation_mb,
            variants=variants, probes=probes, seed=opts.seed,
            energy=reference.energy if reference is not None else None, reference_from_probes=from_probes,
            written_outputs=cal.prep.flow.written_outputs(names),
        )  # fmt: skip
    if from_probes is not None:
        reference = from_probes.reference
    del candidates, variants, from_probes
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
    fold_sites = {n: find_fold_site(cal.prep.flow, n) for n in names}
    table["sq_fold"] = [fold_sites[n].producer or "" for n in names]
    table["sq_fold_reason"] = [fold_sites[n].reason for n in names]
    return Measurement(qmodel, qlayers, result, table, histograms, sweeps, fold_sites, reference, probes)


def _reference_from_probes(
    cal: Calibration, opts: ScanOptions, probes: int, first: int
) -> ReferenceFromProbes | None:
    """Where the held-out batches are one piece both for the probes and for the reference (one LiDAR frame),
    the reference comes from the probes' forward of it; None elsewhere (and across ranks: the energies are
    summed over every rank's pieces before the first probe)."""
    if not probes or D.is_distributed():
        return None
    layers, budget = cal.prep.layers, opts.stored_activation_mb
    pieces = held_pieces(layers, cal.held_local, budget, first)
    if len(pieces) != 1 or len(held_pieces(layers, cal.held_local, budget, first, probe_copies(probes))) != 1:
        return None
    keep_mb = kept_budget_mb(layers, budget, probes)
    return ReferenceFromProbes(layers, pieces, opts.output_selector, opts.device, keep_mb)


def _input_variants(
    qlayers: dict[str, QuantMixin], observers: dict[str, LayerObserver], opts: ScanOptions
) -> dict[str, InputVariants]:
    """Each layer's other calibrator ranges (`CALIBRATOR_CHOICES` but its own), fitted on the calibration
    batches, for the probes to score (none when the choice is off or the probes are)."""
    if not opts.calibrator_choices or opts.probes == 0:
        return {}
    own = opts.spec.calibrator_choice
    out = {}
    for name, qmod in qlayers.items():
        obs = observers[name]
        if obs.range_hist is None or obs.batches == 0:
            continue
        amaxes = {c: obs.calibrator_amax(c) for c in CALIBRATOR_CHOICES if c != own}
        out[name] = InputVariants(qmod.input_quantizer, amaxes)
    return out


def _add_sign_gain(table: pd.DataFrame) -> None:
    """unsigned_gain_db: isolated SQNR with unsigned minus signed activation codes (non-negative inputs)."""
    gain = pd.Series(math.nan, index=table.index)
    if "iso_unsigned_sqnr_db" in table:
        gain = gain.fillna(table["iso_unsigned_sqnr_db"] - table["iso_naive_sqnr_db"])
    if "iso_signed_sqnr_db" in table:
        gain = gain.fillna(table["iso_naive_sqnr_db"] - table["iso_signed_sqnr_db"])
    table["unsigned_gain_db"] = gain


def _sq_columns(
    table: pd.DataFrame, result: PassResult, names: list[str], opts: ScanOptions
) -> dict[str, np.ndarray]:
    """Best SmoothQuant candidate per layer into the table (`iso_sq_*` channel, `iso_sqi_*` im2col) and
    the full alpha sweeps [K, 3] (alpha, iso rel L1, iso SQNR dB) for stats.npz."""
    sweeps: dict[str, np.ndarray] = {}
    for gran, prefix, key in (("channel", "sq", "alpha_sweep"), ("im2col", "sqi", "alpha_sweep_im2col")):
        if gran not in opts.granularities or not opts.alphas:
            continue
        best_rows: list[tuple[str, Any]] = []
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
        if not best_rows:
            continue
        frame = pd.DataFrame.from_dict(
            {
                n: {**{f"iso_{prefix}_{k}": v for k, v in m.items()}, f"{prefix}_alpha": a,
                    f"{prefix}_granularity": gran, f"{prefix}_mode": opts.sq_mode}
                for n, (a, _, _, m, _) in best_rows
            },
            orient="index",
        )  # fmt: skip
        for col in frame.columns:  # one column at a time: layers without a candidate stay NaN
            table[col] = frame[col].reindex(table.index)
    return sweeps
