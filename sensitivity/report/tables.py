"""Table models for the HTML page: which columns to show, how to format cells, how rows are flagged.

Kept free of HTML so the choices (primary vs detail columns, number formats, highlights) are testable and
the template stays a plain loop. Unknown layers.csv columns are never dropped: they land in the detail
columns, which a toggle in the page reveals.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sensitivity.report.data import SIGN_VARIANTS, ReportData

__all__ = [
    "Cell",
    "Column",
    "ComparisonTable",
    "LayerTable",
    "Row",
    "comparison_table",
    "format_number",
    "layer_table",
]

MODE_LABEL = {"iso": "isolated", "cum": "cumulative"}
METRIC_LABEL = {
    "l1": "L1",
    "rel_l1": "rel L1",
    "mse": "MSE",
    "sqnr_db": "SQNR dB",
    "cosine": "cosine",
    "max_abs": "max |err|",
    "nonfinite": "NaN/Inf",
}
FACT_LABEL = {
    "order": "#",
    "name": "layer",
    "type": "type",
    "in_shape": "input shape",
    "out_shape": "output shape",
    "weight_shape": "weight shape",
    "macs": "MACs",
    "calls": "calls",
    "folded_bn": "folded BN",
    "input_min": "input min",
    "input_absmax": "input max |x|",
    "act_unsigned": "unsigned act",
    "outlier_ratio": "outlier ratio",
    "unsigned_gain_db": "unsigned gain dB",
    "decision": "decision",
    "alpha": "α",
    "calibrator": "range",
    "reason": "reason",
    "out_naive_err": "naive, alone",
    "out_best": "best candidate",
    "out_exact_err": "measured, alone",
    "out_err_source": "how",
}
LEAD = ("order", "name", "type", "decision", "alpha", "calibrator", "weight_shape", "out_shape", "macs")
#: the output-referred columns, right after LEAD: what each layer costs at the model's outputs
OUTPUT_COLUMNS = ("out_naive_err", "out_best", "out_exact_err")
PRIMARY_METRICS = ("rel_l1", "sqnr_db")
TAIL = ("outlier_ratio", "reason")
COMPARISON_LABEL = {
    "quantized_layers": "quantized",
    "fp_layers": "FP layers",
    "out_rel_mse": "output rel MSE",
    "out_rel_l1": "output rel L1",
    "out_sqnr_db": "output SQNR dB",
    "out_cosine": "output cosine",
    "out_max_abs": "output max |err|",
    "out_nonfinite": "output NaN/Inf",
    "smoothquant_layers": "SmoothQuant layers",
}


def format_number(value: Any, digits: int = 4) -> str:
    """Compact, exact-enough numbers: 4 significant digits, ∞ for inf, '' for NaN/missing."""
    if value is None or isinstance(value, str):
        return "" if value is None else value
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    number = float(value)
    if math.isnan(number):
        return ""
    if math.isinf(number):
        return "∞" if number > 0 else "−∞"
    if number == int(number) and abs(number) < 1e15:
        return f"{int(number):d}"
    return f"{number:.{digits}g}"


def format_count(value: Any) -> str:
    """MACs and similar: 1.23M with the exact value kept for sorting and the tooltip."""
    number = _float(value)
    if number is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.3g}{unit}"
    return format_number(number)


def _float(value: Any) -> float | None:
    """A number from CSV/JSON values ('inf' strings included); None for NaN, missing, bools and text."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def sort_key(value: Any) -> str:
    """data-v attribute: a number JavaScript's parseFloat reads (Infinity included), or the text."""
    number = _float(value)
    if number is not None:
        return "Infinity" if number == math.inf else "-Infinity" if number == -math.inf else repr(number)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


@dataclass(frozen=True)
class Column:
    """One table column: layers.csv key, header (group line + label), numeric or text, shown or detail."""

    key: str
    label: str
    group: str = ""
    numeric: bool = False
    detail: bool = False
    title: str = ""


@dataclass
class Cell:
    text: str
    sort: str
    classes: str = ""
    title: str = ""


@dataclass
class Row:
    name: str
    cells: list[Cell]
    classes: list[str] = field(default_factory=list)


@dataclass
class LayerTable:
    columns: list[Column]
    rows: list[Row]

    @property
    def detail_count(self) -> int:
        return sum(c.detail for c in self.columns)


def _columns(data: ReportData) -> list[Column]:
    table = data.table
    present = list(table.columns)
    numeric = {c for c in present if pd.api.types.is_numeric_dtype(table[c]) and table[c].dtype != bool}
    cols: list[Column] = []
    used: set[str] = set()

    def add(key: str, *, detail: bool = False, group: str = "", label: str | None = None) -> None:
        if key in present and key not in used:
            used.add(key)
            cols.append(
                Column(key, label or FACT_LABEL.get(key, key), group, key in numeric, detail, title=key)
            )

    for key in LEAD:
        add(key)
    for key in OUTPUT_COLUMNS:
        add(key, group="output error (relative MSE)")
    metric_groups = [(m, mc) for m in ("iso", "cum") for mc in data.methods(m, metric="rel_l1")]
    for mode, method in metric_groups:
        for metric in PRIMARY_METRICS:
            add(
                f"{mode}_{method}_{metric}",
                group=f"{MODE_LABEL[mode]} · {method}",
                label=METRIC_LABEL[metric],
            )
    if any(mc.metric == "nonfinite" for mc in data.metrics):
        cols.append(Column("_nonfinite", "NaN/Inf", "all modes", True, False, "sum of every *_nonfinite"))
    for key in TAIL:
        add(key)
    # detail: every other metric, grouped by mode and method, then every other column in CSV order
    for mc in data.metrics:
        group = f"{MODE_LABEL.get(mc.mode, mc.mode)} · {mc.method}"
        if mc.method in SIGN_VARIANTS:
            group = f"{MODE_LABEL.get(mc.mode, mc.mode)} · {mc.method} act"
        add(mc.column, detail=True, group=group, label=METRIC_LABEL.get(mc.metric, mc.metric))
    for key in present:
        add(key, detail=True)
    return cols


def _cell(column: Column, value: Any, flags: dict[str, float | None]) -> Cell:
    if column.key == "macs":
        return Cell(format_count(value), sort_key(value), "num", format_number(value))
    if column.key == "decision":
        text = "" if _missing(value) else str(value)
        return Cell(text, text, f"decision decision-{text}" if text else "")
    if not column.numeric:
        text = "" if _missing(value) else format_number(value) if isinstance(value, bool) else str(value)
        return Cell(text, sort_key(text), column.key if column.key == "reason" else "")
    digits = 6 if column.key.endswith("_cosine") else 4
    classes = ["num"]
    number = _float(value)
    if number is None:
        classes.append("empty")
    elif column.key.endswith("_nonfinite") and number > 0:
        classes.append("bad")
    elif column.key.startswith("iso_") and column.key.endswith("_rel_l1"):
        limit = flags.get("max_rel_l1")
        if limit is not None and number > limit:
            classes.append("warn")
    elif column.key.startswith("iso_") and column.key.endswith("_sqnr_db"):
        limit = flags.get("min_sqnr_db")
        if limit is not None and number < limit:
            classes.append("warn")
    return Cell(format_number(value, digits), sort_key(value), " ".join(classes))


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def layer_table(data: ReportData) -> LayerTable:
    """Every layer in execution order, with row flags for excluded and non-finite layers."""
    columns = _columns(data)
    nonfinite_cols = [mc.column for mc in data.metrics if mc.metric == "nonfinite"]
    flags = {"max_rel_l1": data.threshold("max_rel_l1"), "min_sqnr_db": data.threshold("min_sqnr_db")}
    excluded = set(data.excluded)
    rows = []
    for record in data.table.to_dict(orient="records"):
        bad = sum(_float(record.get(c)) or 0.0 for c in nonfinite_cols)
        record["_nonfinite"] = bad
        classes = []
        if record["name"] in excluded:
            classes.append("excluded")
        if bad > 0:
            classes.append("nonfinite")
        cells = [_cell(c, record.get(c.key), flags) for c in columns]
        rows.append(Row(str(record["name"]), cells, classes))
    return LayerTable(columns, rows)


@dataclass
class ComparisonTable:
    columns: list[Column]
    rows: list[Row]
    chosen: str | None
    raw_eval: Any = None


def _config_label(config: str, spec: str) -> str:
    return {
        "fp": "FP (reference)",
        "naive": f"all layers naive {spec}".strip(),
        "naive+exclusion": f"naive {spec} + exclusion".replace("  ", " "),
        "policy": "chosen policy",
    }.get(config, config)


def _eval_by_config(value: Any, configs: Iterable[str]) -> dict[str, dict[str, Any]] | None:
    """Normalise scan.json's `eval` (user metric) to {config: {metric: value}}; None if unrecognised."""
    configs = list(configs)
    out: dict[str, dict[str, Any]] = {}
    if isinstance(value, list) and all(isinstance(r, dict) and "config" in r for r in value):
        for r in value:
            out.setdefault(str(r["config"]), {}).update({k: v for k, v in r.items() if k != "config"})
        return out
    if not isinstance(value, dict) or not value:
        return None
    name = str(value.get("metric") or value.get("name") or "eval")
    values = value.get("values") if isinstance(value.get("values"), dict) else None
    if values is not None:
        for config, v in values.items():
            out[str(config)] = v if isinstance(v, dict) else {name: v}
        return out
    if any(k in configs for k in value):
        for config, v in value.items():
            if config in configs:
                out[config] = v if isinstance(v, dict) else {name: v}
        return out
    if all(isinstance(v, dict) for v in value.values()):  # {metric: {config: value}}
        for metric, per_config in value.items():
            for config, v in per_config.items():
                out.setdefault(str(config), {})[str(metric)] = v
        return out if any(c in configs for c in out) else None
    return None


def _comparison_cell(value: Any, digits: int) -> Cell:
    """scan.json values: numbers, None (NaN), 'inf' strings, or any text a user metric carries."""
    number = _float(value)
    if number is not None:
        return Cell(format_number(number, digits), sort_key(number), "num")
    if isinstance(value, str) and value.strip().lower() not in ("", "nan"):
        return Cell(value, value, "num")
    return Cell("", "", "num empty")


def output_table(data: ReportData) -> list[dict[str, str]]:
    """Per named model output and configuration (when the model has several outputs): rows of text."""
    records = [r for r in data.scan.get("output_comparison") or [] if isinstance(r, dict)]
    if len({str(r.get("output")) for r in records}) < 2:
        return []
    return [
        {
            "config": str(r.get("config", "")),
            "output": str(r.get("output", "")),
            **{k: format_number(_float(r.get(f"out_{k}")), 6 if k == "cosine" else 4)
               for k in ("rel_l1", "sqnr_db", "cosine", "max_abs")},
            "nonfinite": format_count(r.get("out_nonfinite")),
        }
        for r in records
    ]  # fmt: skip


def comparison_table(data: ReportData) -> ComparisonTable:
    """FP vs all-naive vs naive+exclusion vs the chosen policy at the model outputs, plus user metrics."""
    records = [dict(r) for r in data.scan.get("comparison") or [] if isinstance(r, dict)]
    spec = str((data.scan.get("spec") or {}).get("spec", ""))
    configs = [str(r.get("config", "")) for r in records]
    evals = _eval_by_config(data.scan.get("eval"), configs) if "eval" in data.scan else None
    raw_eval = data.scan.get("eval") if "eval" in data.scan and evals is None else None
    keys: list[str] = []
    for r in records:
        keys += [k for k in r if k != "config" and k not in keys]
    eval_keys: list[str] = []
    for metrics in (evals or {}).values():
        eval_keys += [k for k in metrics if k not in eval_keys]
    for config in evals or {}:
        if config not in configs:  # a user metric for a configuration without output statistics
            records.append({"config": config})
            configs.append(config)
    columns = [Column("config", "configuration")]
    columns += [Column(k, COMPARISON_LABEL.get(k, k), numeric=True) for k in keys]
    columns += [Column(f"eval:{k}", k, group="user metric", numeric=True) for k in eval_keys]
    chosen = "policy" if "policy" in configs else "naive+exclusion" if "naive+exclusion" in configs else None
    rows = []
    for r in records:
        config = str(r.get("config", ""))
        cells = [Cell(_config_label(config, spec), config, "config", config)]
        for k in keys:
            cells.append(_comparison_cell(r.get(k), 6 if k.endswith("cosine") else 4))
            if k.endswith("nonfinite") and (_float(r.get(k)) or 0) > 0:
                cells[-1].classes += " bad"
        for k in eval_keys:
            cells.append(_comparison_cell((evals or {}).get(config, {}).get(k), 4))
        classes = ["chosen"] if config == chosen else []
        nf = _float(r.get("out_nonfinite"))
        if nf:
            classes.append("nonfinite")
        rows.append(Row(config, cells, classes))
    return ComparisonTable(columns, rows, chosen, raw_eval)
