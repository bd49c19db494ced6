"""The Typer app every command module registers into."""

from __future__ import annotations

import typer

__all__ = ["app"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Find the layers that quantization breaks, and decide per layer: FP, naive W8A8, or SmoothQuant.",
    pretty_exceptions_enable=False,
)
