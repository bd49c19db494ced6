"""Stage 2b: each layer's effect on the model's outputs, for each of its candidates.

The measure pass already dotted every candidate's isolated error with the output probes' gradients
(`PassResult.pred`). Here those predictions become the table's `out_<candidate>_err` columns (relative
output MSE on the held-out batches, that layer alone quantized that way), and the layers the probes could
not see are measured exactly instead, never scored 0 and never ranked by their isolated error: layers no
gradient reached (a `.detach()`, `argmax` or `no_grad` in the model's forward, an op without a backward) get their
naive error from one quantized forward each over the held-out batches (`OutputReference`). Their other
candidates (calibrators, SmoothQuant) stay unpredicted (NaN): the policy gives them naive or FP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd

from sensitivity.io.batches import batch_len
from sensitivity.pipeline.calibration import Calibration
from sensitivity.pipeline.exact import OutputReference
from sensitivity.pipeline.measure import Measurement
from sensitivity.pipeline.options import PhaseProgress, ScanOptions
from sensitivity.quant.build import LayerQuant

__all__ = ["OutputSensitivity", "out_column", "output_stage"]

PROBE = "probe"
EXACT = "exact"


def out_column(candidate: str) -> str:
    """The table column of a candidate's output error: `out_naive_err`, `out_sq_channel_0.5_err`, ..."""
    return f"out_{candidate}_err"


@dataclass
class OutputSensitivity:
    """Per layer: its candidates' output errors, how they were obtained, and the exact-measurement tools."""

    errors: dict[str, dict[str, float]]
    source: dict[str, str]
    reference: OutputReference | None
    probes: int
    #: naive settings of every layer fitted on the calibration batches (what the held-out scoring measured)
    fit_configs: dict[str, LayerQuant]

    def best(self, layer: str) -> tuple[str, float]:
        """The candidate with the least output error at `layer` (naive where nothing was predicted)."""
        found = {c: e for c, e in self.errors.get(layer, {}).items() if not math.isnan(e)}
        if not found:
            return "naive", math.nan
        key = min(found, key=lambda c: (found[c], c != "naive"))
        return key, found[key]


def _why_no_gradient(failed: str) -> str:
    return (
        f"{EXACT}: the probes' backward failed ({failed})" if failed else f"{EXACT}: no gradient reaches it"
    )


def output_stage(
    cal: Calibration, meas: Measurement, opts: ScanOptions, progress: PhaseProgress, timings: dict[str, float]
) -> OutputSensitivity:
    """`out_*_err` and `out_err_source` into `meas.table`; exact measurement where the probes saw nothing."""
    t = time.perf_counter()
    names, result, table = cal.names, meas.result, meas.table
    fit_configs = cal.fit_configs()
    samples = sum(batch_len(b) or 1 for b in cal.held)  # all ranks'
    probes = meas.probes
    errors: dict[str, dict[str, float]] = {n: {} for n in names}
    for layer, cand in result.pred:
        if layer in errors:
            errors[layer][cand] = result.predicted(layer, cand)
    blind = [n for n in names if result.grad_max.get(n, 0.0) <= 0.0 or result.probe_failed]
    source = {n: f"{PROBE} ({probes} x {samples} samples)" for n in names}
    reference = meas.reference
    if probes and reference is not None and blind:
        with progress.phase("exact output errors", len(blind)) as advance:
            for n in blind:
                errors[n] = {"naive": reference.alone(meas.qmodel, names, n, fit_configs[n])}
                source[n] = _why_no_gradient(result.probe_failed)
                advance()
    if probes:
        _columns(table, names, errors, source)
    timings["output_s"] = time.perf_counter() - t
    return OutputSensitivity(errors, source if probes else {}, reference, probes, fit_configs)


def _columns(
    table: pd.DataFrame, names: list[str], errors: dict[str, dict[str, float]], source: dict[str, str]
) -> None:
    keys = sorted({c for per in errors.values() for c in per}, key=lambda c: (c != "naive", c))
    for cand in keys:
        table[out_column(cand)] = [errors[n].get(cand, math.nan) for n in names]
    table["out_err_source"] = [source[n] for n in names]
