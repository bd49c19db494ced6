"""Everything the CLI prints: the consoles (stderr for progress and errors, stdout for results), the
progress bars the library reports phases to, and the scan summary tables. Only the CLI imports rich."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["RichProgress", "console", "fmt", "out"]


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
