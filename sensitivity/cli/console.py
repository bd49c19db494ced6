"""Everything the CLI prints: the consoles (stderr for progress and errors, stdout for results), the
progress bars the library reports phases to, and the scan summary tables. Only the CLI imports rich."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["RichProgress", "console", "fmt", "out", "print_summary"]


def _console(stderr: bool = False) -> Console:
    """A rich console; when not writing to a terminal (piped, redirected) tables are not squeezed into 80
    columns, so layer names stay on one line."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=max(probe.width, 200))


console = _console(stderr=True)
out = _console()


class RichProgress:
    """A rich progress bar per scan phase (the library only calls phase()/note())."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    @contextmanager
    def phase(self, name: str, total: int) -> Iterator[Callable[[], None]]:
        if not self.enabled:
            yield lambda: None
            return
        with Progress(
            TextColumn("[bold blue]{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task(name, total=total)
            yield lambda: bar.advance(task)

    def note(self, message: str) -> None:
        console.print(f"[dim]{message}[/dim]")


def fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        if value != value:
            return "-"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return f"{value:.{digits}g}"
    return str(value)


def print_summary(result: Any, out_dir: Path | None, top: int = 10) -> None:
    """The comparison table (with the user metric when there is one) and the worst layers."""
    comp = Table(
        title=f"{result.model_name}: {result.spec.name} ({result.spec.calibrator}) on held-out batches"
    )
    evals = [c for c in result.comparison.columns if str(c).startswith("eval_")]
    cols = ("config", "quantized", "FP", "SQ", "out rel L1", "out SQNR dB", "cosine", "non-finite")
    for col in (*cols, *(c.removeprefix("eval_") for c in evals)):
        comp.add_column(col, justify="right" if col != "config" else "left", no_wrap=True)
    for row in result.comparison.to_dict(orient="records"):
        comp.add_row(
            row["config"],
            str(row["quantized_layers"]),
            str(row["fp_layers"]),
            str(row.get("smoothquant_layers", 0)),
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
    worst = table.sort_values("iso_naive_rel_l1", ascending=False, na_position="first").head(top)
    t = Table(title=f"worst {len(worst)} of {len(table)} layers (isolated error)")
    for col in ("#", "layer", "type", "iso rel L1", "iso SQNR dB", "cum rel L1", "non-finite", "decision"):
        t.add_column(col, justify="left" if col in ("layer", "type", "decision") else "right", no_wrap=True)
    for name, row in worst.iterrows():
        decision = row["decision"]
        style = "red" if decision == "fp" else None
        t.add_row(
            str(row["order"]),
            str(name),
            row["type"],
            fmt(row["iso_naive_rel_l1"]),
            fmt(row["iso_naive_sqnr_db"]),
            fmt(row["cum_naive_rel_l1"]),
            fmt(int(row["iso_naive_nonfinite"] + row["cum_naive_nonfinite"])),
            decision,
            style=style,
        )
    out.print(t)
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
