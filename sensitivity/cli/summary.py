"""The scan summary the CLI prints: the comparison at the model's outputs, the layers that cost the most
there (or, without output probes, the worst isolated errors), the FP curve, the decisions and warnings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from sensitivity.cli.console import console, fmt, out

__all__ = ["print_summary"]


def print_summary(result: Any, out_dir: Path | None, top: int = 10) -> None:
    """The comparison table (with the user metric when there is one) and the worst layers."""
    comp = Table(
        title=f"{result.model_name}: {result.spec.name} ({result.spec.calibrator}) on held-out batches"
    )
    evals = [c for c in result.comparison.columns if str(c).startswith("eval_")]
    cols = (
        "config",
        "quantized",
        "FP",
        "SQ",
        "out rel MSE",
        "out rel L1",
        "out SQNR dB",
        "cosine",
        "non-finite",
    )
    for col in (*cols, *(c.removeprefix("eval_") for c in evals)):
        comp.add_column(col, justify="right" if col != "config" else "left", no_wrap=True)
    for row in result.comparison.to_dict(orient="records"):
        comp.add_row(
            row["config"],
            str(row["quantized_layers"]),
            str(row["fp_layers"]),
            str(row.get("smoothquant_layers", 0)),
            fmt(row.get("out_rel_mse", float("nan")), 3),
            fmt(row["out_rel_l1"]),
            fmt(row["out_sqnr_db"]),
            fmt(row["out_cosine"], 6),
            fmt(int(row["out_nonfinite"])),
            *(fmt(row[c]) for c in evals),
        )
    out.print(comp)
    per_output = result.output_comparison
    if len(per_output) and per_output["output"].nunique() > 1:
        t = Table(title="per model output (held-out batches)")
        for col in ("config", "output", "rel L1", "SQNR dB", "cosine", "max |err|", "non-finite"):
            t.add_column(col, justify="left" if col in ("config", "output") else "right", no_wrap=True)
        for r in per_output.to_dict(orient="records"):
            cells = (
                fmt(r["out_rel_l1"]),
                fmt(r["out_sqnr_db"]),
                fmt(r["out_cosine"], 6),
                fmt(r["out_max_abs"]),
            )
            t.add_row(r["config"], r["output"], *cells, fmt(int(r["out_nonfinite"])))
        out.print(t)
    table = result.table
    if "out_naive_err" in table.columns:
        _print_output_worst(table, top)
        _print_curve(result)
    else:
        _print_isolated_worst(table, top)
    if result.first_nonfinite:
        out.print(
            f"[red]first non-finite values in the quantized model at: {escape(result.first_nonfinite)}[/red]",
            soft_wrap=True,
        )
    decisions = table["decision"].value_counts()
    out.print(
        f"naive+exclusion keeps {len(result.excluded)} of {len(table)} layers in FP; the policy: "
        f"{decisions.get('smoothquant', 0)} SmoothQuant, {decisions.get('naive', 0)} naive, "
        f"{decisions.get('fp', 0)} FP",
        soft_wrap=True,
    )
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", soft_wrap=True, highlight=False)
    if out_dir is not None:
        out.print(f"report written to [bold]{escape(str(out_dir))}[/bold]", soft_wrap=True)


def _print_isolated_worst(table: Any, top: int) -> None:
    worst = table.sort_values("iso_naive_rel_l1", ascending=False, na_position="first").head(top)
    t = Table(title=f"worst {len(worst)} of {len(table)} layers (isolated error)")
    for col in ("#", "layer", "type", "iso rel L1", "iso SQNR dB", "cum rel L1", "non-finite", "decision"):
        t.add_column(col, justify="left" if col in ("layer", "type", "decision") else "right", no_wrap=True)
    for name, row in worst.iterrows():
        decision = row["decision"]
        t.add_row(
            str(row["order"]),
            str(name),
            row["type"],
            fmt(row["iso_naive_rel_l1"]),
            fmt(row["iso_naive_sqnr_db"]),
            fmt(row["cum_naive_rel_l1"]),
            fmt(int(row["iso_naive_nonfinite"] + row["cum_naive_nonfinite"])),
            decision,
            style="red" if decision == "fp" else None,
        )
    out.print(t)


def _method(row: Any) -> str:
    """The decision as one word: fp, naive, naive p99.99, SmoothQuant 0.5."""
    if row["decision"] == "smoothquant":
        return f"SmoothQuant {row['alpha']:g}"
    cal = row.get("calibrator")
    return (
        f"naive {cal}"
        if row["decision"] == "naive" and isinstance(cal, str) and cal
        else str(row["decision"])
    )


def _print_output_worst(table: Any, top: int) -> None:
    """The layers that cost the most at the model's outputs (each alone, naive), with their decision."""
    worst = table.sort_values("out_naive_err", ascending=False, na_position="first").head(top)
    t = Table(title=f"worst {len(worst)} of {len(table)} layers at the outputs (each alone, naive)")
    cols = ("#", "layer", "type", "out err", "best", "best err", "exact", "iso rel L1", "decision")
    for col in cols:
        t.add_column(
            col, justify="left" if col in ("layer", "type", "best", "decision") else "right", no_wrap=True
        )
    for name, row in worst.iterrows():
        best = row.get("out_best", "naive")
        best = best if isinstance(best, str) else "naive"
        best_err = row.get(f"out_{best}_err", row["out_naive_err"])
        exact = row.get("out_exact_err", float("nan"))
        if str(row.get("out_err_source", "")).startswith("exact"):
            exact = row["out_naive_err"]
        t.add_row(
            str(row["order"]),
            str(name),
            row["type"],
            fmt(row["out_naive_err"], 3),
            best,
            fmt(best_err, 3),
            fmt(exact, 3),
            fmt(row["iso_naive_rel_l1"], 3),
            _method(row),
            style="red" if row["decision"] == "fp" else None,
        )
    out.print(t)


def _print_curve(result: Any) -> None:
    """Relative output MSE as the FP layers are added to the all-naive model, then the policy, predicted (and
    measured where a pass ran)."""
    curve = getattr(result, "fp_curve", [])
    if len(curve) < 2:
        return
    t = Table(title="output error vs layers kept in FP (relative output MSE, held-out batches)")
    for col in ("FP layers", "added", "predicted", "measured"):
        t.add_column(col, justify="left" if col == "added" else "right", no_wrap=True)
    for p in curve:
        added = "+ the policy's methods" if p.policy else p.layer or "(every layer naive)"
        t.add_row(str(p.fp_layers), added, fmt(p.predicted, 3), fmt(p.measured, 3))
    out.print(t)
